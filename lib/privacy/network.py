"""Tables with margins as flow networks: fast complementary suppression and an exact attacker check.

A slice's statistics (cells and margin entries) and its margin equations
(``margin = sum of its cells``) form a network when the margins make at most two
chains of nested groupings (``origin`` and ``destination`` with the grand total; a
unit, its ``admin1`` parent and the total; no margins at all): every statistic is
then an arc and every equation a node where inflow equals outflow.

- Chain 1 (e.g. origins, or admin2 -> admin1): the arc of a margin entry runs from
  its parent's node (the next coarser group, else the total's first node, else
  *ground*) to its own node.
- Cells run from the node of their finest chain-1 group to the node of their
  finest chain-2 group (or the total's nodes, or ground).
- Chain 2 (e.g. destinations): the arc of a margin entry runs from its own node to
  its parent's node.
- The grand total runs from the total's second node to its first.

Ground has no equation of its own (its balance is implied by the others). The
node equations are linear combinations of the slice's equations and vice versa,
so the attacker's feasible set (withheld cells >= 1, withheld margins >= 0, every
equation exact) is the same; its constraint matrix is a network matrix, so every
bound the attacker can derive is an integer and is reached by a flow.

Two uses:

- :func:`protect` (the guard, which knows the true values): for each withheld
  statistic that must be protected, push flow around cycles through it, starting
  from the true table, until it can reach ``threshold + 1``; a cycle may run
  through published statistics, which then become complementary suppressions
  (cheapest first: small cells before large ones, margins last). A pushed flow
  is a table consistent with everything published, so each protected statistic
  comes with a constructive proof.
- :func:`attack` (audit verify, which knows only what was published): a table
  consistent with the published values from one maximum flow, then for every
  withheld statistic whether some consistent table puts it above the threshold and
  whether it can take two values, by short cycles first and an exact feasibility
  flow when no short cycle is found. Its answers equal the linear-programming
  attacker's (tested against it on random tables).

Work per statistic is local (a search from its arc that stops at the first
cycle with enough capacity), so a slice costs about linear time in its cells.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

GROUND = 0
MARGIN_COST = 1_000_000  # suppressing a margin costs more than any cell
LOCAL_BUDGET = 2000  # nodes a search visits near a statistic before it looks further
HOP = 4  # cost of moving one more withheld statistic on a cycle, against a published value


@dataclass
class Network:
    """Statistics of a slice as arcs: cells first (in the input order), then margin entries by spec and key."""

    n_nodes: int
    tail: np.ndarray
    head: np.ndarray
    lb: np.ndarray  # 1 for cells (a listed cell is never zero), 0 for margins
    is_cell: np.ndarray
    kinds: list[str]  # "cell" or the margin name, per arc
    keys: list[tuple]  # group key per arc (cells: their dims)

    @property
    def n_arcs(self) -> int:
        return len(self.tail)

    def adjacency(self) -> tuple[list[list[int]], list[list[int]]]:
        """Per node: arcs leaving it (traversed forward: increase) and arcs entering it (backward: decrease)."""
        out: list[list[int]] = [[] for _ in range(self.n_nodes)]
        inc: list[list[int]] = [[] for _ in range(self.n_nodes)]
        for a, (u, w) in enumerate(zip(self.tail.tolist(), self.head.tolist(), strict=True)):
            if u == w:
                continue  # a self-loop (a statistic in no equation) links nothing
            out[u].append(a)
            inc[w].append(a)
        return out, inc


def _codes(frame: pd.DataFrame, by: Sequence[str]) -> np.ndarray:
    if not by:
        return np.zeros(len(frame), dtype=np.int64)
    return frame.groupby(list(by), sort=True, dropna=False).ngroup().to_numpy(dtype=np.int64)


def _refines(fine: np.ndarray, coarse: np.ndarray) -> bool:
    """Every group of ``fine`` lies inside one group of ``coarse``."""
    if len(fine) == 0:
        return True
    pairs = np.unique(np.stack([fine, coarse], axis=1), axis=0)
    return len(pairs) == len(np.unique(fine))


def chains(margins: Sequence[Sequence[str]], codes: dict[int, np.ndarray]) -> tuple[list[int], list[int], bool] | None:
    """Split the margin specs into two chains of nested groupings (indices, finest first) and whether the
    grand total is published; None when the specs are not two such chains (no network). ``codes``: each
    spec's group code per cell."""
    total = any(len(m) == 0 for m in margins)
    others = [i for i, m in enumerate(margins) if len(m) > 0]
    if len({tuple(margins[i]) for i in others}) != len(others) or sum(len(m) == 0 for m in margins) > 1:
        return None  # the same grouping twice: not a network (and never needed)
    order = sorted(others, key=lambda i: (-len(np.unique(codes[i])), i))
    c1: list[int] = []
    c2: list[int] = []
    for i in order:
        if not c1 or _refines(codes[c1[-1]], codes[i]):
            c1.append(i)
        elif not c2 or _refines(codes[c2[-1]], codes[i]):
            c2.append(i)
        else:
            return None
    return c1, c2, total


def build(frame: pd.DataFrame, dims: Sequence[str], margins: Sequence[Sequence[str]]) -> Network | None:
    """The network of a slice (``frame`` holds its cells' dims), or None when the margins are not two chains.

    Arc order: cells in frame order, then for each margin spec in the given order its groups sorted by key,
    the same order as :func:`lib.privacy.guard.build_slice`.
    """
    codes = {i: _codes(frame, m) for i, m in enumerate(margins)}
    split = chains(margins, codes)
    if split is None:
        return None
    c1, c2, has_total = split
    n = len(frame)
    # Margin arcs: index offset of each spec's groups, in spec order.
    offsets: dict[int, int] = {}
    kinds = ["cell"] * n
    keys: list[tuple] = [tuple(r) for r in frame[list(dims)].itertuples(index=False, name=None)]
    pos = n
    for i, m in enumerate(margins):
        offsets[i] = pos
        name = "+".join(m) if m else "total"
        if m:
            first = pd.DataFrame({"g": codes[i]}).drop_duplicates("g").sort_values("g").index.to_numpy()
            keys.extend(frame[list(m)].iloc[first].itertuples(index=False, name=None))
            kinds.extend([name] * len(first))
        else:
            keys.append(())
            kinds.append(name)
        pos += len(np.unique(codes[i])) if m else 1
    n_arcs = pos
    tail = np.zeros(n_arcs, dtype=np.int64)
    head = np.zeros(n_arcs, dtype=np.int64)
    next_node = 1
    total_spec = next((i for i, m in enumerate(margins) if not m), None)
    tn1 = tn2 = GROUND
    if has_total:
        tn1, tn2 = next_node, next_node + 1
        next_node += 2
    node_of: dict[int, np.ndarray] = {}  # spec -> node id per group code
    for i in c1 + c2:
        k = len(np.unique(codes[i]))
        node_of[i] = np.arange(next_node, next_node + k, dtype=np.int64)
        next_node += k

    def group_node(chain: list[int], level: int, root: int) -> np.ndarray:
        """Per cell: the node of its group at ``level`` of the chain, or ``root`` past the chain's top."""
        if level < len(chain):
            return node_of[chain[level]][codes[chain[level]]]
        return np.full(n, root, dtype=np.int64)

    tail[:n], head[:n] = group_node(c1, 0, tn1), group_node(c2, 0, tn2)
    for chain, root, forward in ((c1, tn1, True), (c2, tn2, False)):
        for level, i in enumerate(chain):
            own = node_of[i]
            above = group_node(chain, level + 1, root)
            first_cell = np.zeros(len(own), dtype=np.int64)  # any cell of each group: the last one written wins
            first_cell[codes[i]] = np.arange(n)
            par = above[first_cell]
            idx = offsets[i] + np.arange(len(own))
            if forward:
                tail[idx], head[idx] = par, own
            else:
                tail[idx], head[idx] = own, par
    if total_spec is not None:
        tail[offsets[total_spec]], head[offsets[total_spec]] = tn2, tn1
    lb = np.zeros(n_arcs, dtype=np.int64)
    lb[:n] = 1
    is_cell = np.zeros(n_arcs, dtype=bool)
    is_cell[:n] = True
    return Network(next_node, tail, head, lb, is_cell, kinds, keys)


# ----------------------------------------------------------------------------- the guard (true values known)


class Unprotectable(RuntimeError):
    def __init__(self, arc: int, detail: str) -> None:
        super().__init__(detail)
        self.arc = arc


def protect(net: Network, values: np.ndarray, withheld: np.ndarray, threshold: int,
            budget: int = LOCAL_BUDGET) -> np.ndarray:
    """Complementary suppression: returns the new withheld mask (a superset of ``withheld``).

    Every withheld statistic whose value is at or below ``threshold`` gets enough flow around cycles
    through it to reach ``threshold + 1`` in a table consistent with the published values; published
    statistics on those cycles are withheld too (they move with the cycle, so none is pinned).
    """
    out_adj, in_adj = net.adjacency()
    tail, head = net.tail.tolist(), net.head.tolist()
    vals = [int(v) for v in values]
    lb = net.lb.tolist()
    held = [bool(w) for w in withheld]
    cost = [(v if c else v + MARGIN_COST) for v, c in zip(vals, net.is_cell.tolist(), strict=True)]
    todo = sorted((a for a in range(len(vals)) if held[a] and vals[a] <= threshold),
                  key=lambda a: (-(threshold + 1 - vals[a]), a))
    for e in todo:
        if tail[e] == head[e]:
            continue  # in no equation: unbounded above
        need = threshold + 1 - vals[e]
        delta: dict[int, int] = {}
        while need > 0:
            path = _bfs_path(head[e], tail[e], e, out_adj, in_adj, tail, head, vals, lb, held, delta, budget)
            if path is None:  # the cheapest cycle through published cells near it, else anywhere
                for limit in (budget, 1 << 62):
                    path = _cheapest_path(head[e], tail[e], e, out_adj, in_adj, tail, head, vals, lb, held, cost,
                                          delta, limit)
                    if path is not None:
                        break
            if path is None:
                # the message names the statistic, never its value (an exact small count in a log)
                raise Unprotectable(e, f"no cycle through it can raise it above {threshold}")
            for a, _ in path:
                held[a] = True  # published statistics on the cycle become complementary suppressions
            need -= _push(path, need, vals, lb, delta)
    return np.array(held, dtype=bool)


def _push(path: list[tuple[int, int]], need: int, x: list[int], lb: list[int], delta: dict[int, int]) -> int:
    """Push as much as the path allows, up to ``need``, into ``delta``; returns the amount pushed."""
    push = need
    for a, sign in path:
        if sign < 0:
            push = min(push, x[a] - lb[a] + delta.get(a, 0))
    for a, sign in path:
        delta[a] = delta.get(a, 0) + sign * push
    return push


def _trace(pred: dict[int, tuple[int, int, int]], s: int, n: int) -> list[tuple[int, int]]:
    """The path s -> n recorded in ``pred`` (node -> (arc, sign, previous node)), in order."""
    path = []
    while n != s:
        a, sign, prev = pred[n]
        path.append((a, sign))
        n = prev
    return path[::-1]


def _cheapest_path(s: int, t: int, skip: int, out_adj: list[list[int]], in_adj: list[list[int]],
                   tail: list[int], head: list[int], vals: list[int], lb: list[int], held: list[bool],
                   cost: list[int], delta: dict[int, int], limit: int) -> list[tuple[int, int]] | None:
    """Cheapest residual path s -> t (Dijkstra; each step costs HOP, a published statistic its cost too),
    each decrease with a unit to spare, visiting at most ``limit`` nodes. Returns [(arc, +1 / -1)]."""
    dist = {s: 0}
    pred: dict[int, tuple[int, int, int]] = {}
    heap = [(0, 0, s)]
    counter = 1
    done: set[int] = set()
    while heap:
        d, _, n = heapq.heappop(heap)
        if n in done:
            continue
        if n == t:
            return _trace(pred, s, n)
        done.add(n)
        if len(done) > limit:
            return None
        # arcs leaving n are increased (no bound), arcs entering n decreased (down to their lower bound)
        for arcs, ends, sign in ((out_adj[n], head, 1), (in_adj[n], tail, -1)):
            for a in arcs:
                if a == skip or (sign < 0 and vals[a] - lb[a] + delta.get(a, 0) < 1):
                    continue
                m = ends[a]
                nd = d + HOP + (0 if held[a] else cost[a])
                if nd < dist.get(m, math.inf):
                    dist[m] = nd
                    pred[m] = (a, sign, n)
                    heapq.heappush(heap, (nd, counter, m))
                    counter += 1
    return None


def _bfs_path(s: int, t: int, skip: int, out_adj: list[list[int]], in_adj: list[list[int]], tail: list[int],
              head: list[int], x: list[int], lb: list[int], held: list[bool], delta: dict[int, int],
              budget: int) -> list[tuple[int, int]] | None:
    """Shortest residual path s -> t through withheld arcs only (a decrease needs one unit to spare), or None.

    Breadth-first from s; the last step into t is looked up in a table of t's residual predecessors, so a
    path of length L is found after expanding nodes up to depth L - 2 only. Gives up after ``budget`` nodes.
    """
    into_t: dict[int, tuple[int, int]] = {}
    for a in in_adj[t]:  # an arc entering t, increased
        if a != skip and held[a]:
            into_t.setdefault(tail[a], (a, 1))
    for a in out_adj[t]:  # an arc leaving t, decreased
        if a != skip and held[a] and x[a] - lb[a] + delta.get(a, 0) >= 1:
            into_t.setdefault(head[a], (a, -1))
    if not into_t:
        return None
    pred: dict[int, tuple[int, int, int]] = {s: (-1, 0, -1)}
    queue = [s]
    i = 0
    end = -1
    while end < 0 and i < len(queue) and len(pred) <= budget:
        n = queue[i]
        i += 1
        if n in into_t:
            end = n
            break
        # arcs leaving n are increased (no bound), arcs entering n decreased (a unit to spare)
        for arcs, ends, sign in ((out_adj[n], head, 1), (in_adj[n], tail, -1)):
            for a in arcs:
                if a == skip or not held[a] or (sign < 0 and x[a] - lb[a] + delta.get(a, 0) < 1):
                    continue
                m = ends[a]
                if m in pred:
                    continue
                pred[m] = (a, sign, n)
                if m == t or m in into_t:
                    end = m
                    break
                queue.append(m)
            if end >= 0:
                break
    if end < 0:
        return None
    path = _trace(pred, s, end)
    return path if end == t else [*path, into_t[end]]


# ----------------------------------------------------------------------------- the attacker (published values only)


class Contradiction(ValueError):
    """The published values admit no table at all (they do not add up)."""


@dataclass
class Finding:
    arc: int
    low: float  # bounds proved (not necessarily tight) for a failing statistic
    high: float


def _feasible_flow(net: Network, fixed: np.ndarray, held: np.ndarray, lb: np.ndarray,
                   cap: np.ndarray | None = None) -> tuple[bool, np.ndarray | None]:
    """A table consistent with the published values: withheld arcs get a flow >= lb (<= cap when given),
    published arcs keep ``fixed``. Returns (feasible, flow on every arc)."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_flow

    nn = net.n_nodes
    balance = np.zeros(nn, dtype=np.int64)  # required inflow - outflow of withheld arcs at each node
    pub = ~held
    np.add.at(balance, net.tail[pub], fixed[pub])
    np.subtract.at(balance, net.head[pub], fixed[pub])
    np.subtract.at(balance, net.head[held], lb[held])
    np.add.at(balance, net.tail[held], lb[held])
    balance[GROUND] = -balance[1:].sum()
    src, snk = nn, nn + 1
    supply = np.where(balance < 0, -balance, 0)
    demand = np.where(balance > 0, balance, 0)
    total = int(supply.sum())
    big = total + 1
    h = np.flatnonzero(held)
    loops = net.tail[h] == net.head[h]
    hh = h[~loops]
    arc_cap = np.full(len(hh), big, dtype=np.int64)
    if cap is not None:
        arc_cap = np.minimum(arc_cap, np.maximum(cap[hh] - lb[hh], 0))
    rows = np.concatenate([net.tail[hh], np.full(nn, src), np.arange(nn)])
    cols = np.concatenate([net.head[hh], np.arange(nn), np.full(nn, snk)])
    data = np.concatenate([arc_cap, supply, demand])
    keep = (data > 0) & (rows != cols)
    rows, cols, data = rows[keep], cols[keep], data[keep]
    key = rows * (nn + 2) + cols
    uniq, inv = np.unique(key, return_inverse=True)
    summed = np.zeros(len(uniq), dtype=np.int64)
    np.add.at(summed, inv, data)
    summed = np.minimum(summed, np.iinfo(np.int32).max // 4)
    g = csr_matrix((summed.astype(np.int32), (uniq // (nn + 2), uniq % (nn + 2))), shape=(nn + 2, nn + 2))
    if total == 0:
        flow_arcs = np.zeros(len(hh), dtype=np.int64)
    else:
        res = maximum_flow(g, src, snk)
        if res.flow_value < total:
            return False, None
        f = res.flow.tocsr()
        # net flow per node pair, handed to the pair's arcs in order (capacity-bounded when capped)
        pair_flow: dict[tuple[int, int], int] = {}
        coo = f.tocoo()
        for r, c, v in zip(coo.row.tolist(), coo.col.tolist(), coo.data.tolist(), strict=True):
            if v > 0 and r < nn and c < nn:
                pair_flow[(r, c)] = pair_flow.get((r, c), 0) + int(v)
        flow_arcs = np.zeros(len(hh), dtype=np.int64)
        for j, (u, w) in enumerate(zip(net.tail[hh].tolist(), net.head[hh].tolist(), strict=True)):
            left = pair_flow.get((u, w), 0)
            if left <= 0:
                continue
            take = min(left, int(arc_cap[j]))
            flow_arcs[j] = take
            pair_flow[(u, w)] = left - take
    x = fixed.astype(np.int64).copy()
    x[h] = lb[h]
    x[hh] += flow_arcs
    return True, x


def attack(net: Network, published: np.ndarray, threshold: int, local_budget: int = 5000) -> list[Finding]:
    """The attacker's verdict from published values only (NaN = withheld): every withheld statistic that is
    pinned to one value or cannot exceed ``threshold``. Raises Contradiction when no table fits."""
    held = np.isnan(published)
    fixed = np.where(held, 0, np.nan_to_num(published)).astype(np.int64)
    ok, base = _feasible_flow(net, fixed, held, net.lb)
    if not ok or base is None:
        raise Contradiction("the published cells and margins admit no table (they do not add up)")
    out_adj, in_adj = net.adjacency()
    tail, head = net.tail.tolist(), net.head.tolist()
    x = [int(v) for v in base]
    lb = net.lb.tolist()
    hl = held.tolist()
    findings = []
    for e in np.flatnonzero(held).tolist():
        if tail[e] == head[e]:
            continue  # in no equation: any value >= its lower bound
        need = max(threshold + 1 - x[e], 1)
        if _local_flow(head[e], tail[e], e, need, out_adj, in_adj, tail, head, x, lb, hl, local_budget) >= need:
            continue
        if x[e] <= threshold:
            # exact: can any consistent table reach threshold + 1?
            lb2 = net.lb.copy()
            lb2[e] = threshold + 1
            if not _feasible_flow(net, fixed, held, lb2)[0]:
                findings.append(Finding(e, float(net.lb[e]), float(threshold)))
            continue
        # above the threshold in the base table: is it pinned there? Short cycles down, then exact both ways.
        if x[e] - 1 >= lb[e] and _local_flow(tail[e], head[e], e, 1, out_adj, in_adj, tail, head, x, lb, hl,
                                             local_budget) >= 1:
            continue
        lb2 = net.lb.copy()
        lb2[e] = x[e] + 1
        if _feasible_flow(net, fixed, held, lb2)[0]:
            continue
        cap = np.full(net.n_arcs, np.iinfo(np.int64).max // 4, dtype=np.int64)
        cap[e] = x[e] - 1
        if x[e] - 1 < lb[e] or not _feasible_flow(net, fixed, held, net.lb, cap)[0]:
            findings.append(Finding(e, float(x[e]), float(x[e])))
    return findings


def _local_flow(s: int, t: int, skip: int, need: int, out_adj: list[list[int]], in_adj: list[list[int]],
                tail: list[int], head: list[int], x: list[int], lb: list[int], held: list[bool],
                budget: int) -> int:
    """Flow (up to ``need``) from s to t through withheld arcs in the residual network of the table ``x``
    (skipping arc ``skip``), by shortest augmenting paths that each visit at most ``budget`` nodes."""
    delta: dict[int, int] = {}
    got = 0
    while got < need:
        path = _bfs_path(s, t, skip, out_adj, in_adj, tail, head, x, lb, held, delta, budget)
        if path is None:
            return got
        got += _push(path, need - got, x, lb, delta)
    return got
