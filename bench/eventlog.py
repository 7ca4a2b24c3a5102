"""Where a Spark run spent its time, from its event log: ``python -m bench.eventlog <log file or folder>``.

Prints the jobs and stages that took longest (wall time from submission to completion), with the
call site Spark records for each, their task time and the bytes they read, wrote and shuffled. Used
by ``./bench/run cdr --event-log`` to find where the pipeline's time goes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _events(path: Path) -> list[dict[str, Any]]:
    files = sorted(p for p in path.rglob("events_*") if p.is_file()) if path.is_dir() else [path]
    out = []
    for f in files:
        with f.open() as fh:
            out += [json.loads(line) for line in fh if line.strip()]
    return out


def summary(path: Path, top: int = 25) -> str:
    stages: dict[tuple[int, int], dict[str, Any]] = {}
    jobs: dict[int, dict[str, Any]] = {}
    for e in _events(path):
        kind = e.get("Event")
        if kind == "SparkListenerJobStart":
            props = e.get("Properties") or {}
            jobs[e["Job ID"]] = {"start": e["Submission Time"], "desc": props.get("spark.job.description")
                                 or props.get("callSite.short") or "", "stages": e.get("Stage IDs", [])}
        elif kind == "SparkListenerJobEnd" and e["Job ID"] in jobs:
            jobs[e["Job ID"]]["end"] = e["Completion Time"]
        elif kind == "SparkListenerStageCompleted":
            info = e["Stage Info"]
            acc = {a.get("Name"): a.get("Value") for a in info.get("Accumulables", [])}
            key = (info["Stage ID"], info["Stage Attempt ID"])
            stages[key] = {
                "id": info["Stage ID"], "name": info["Stage Name"], "tasks": info["Number of Tasks"],
                "wall": (info.get("Completion Time", 0) - info.get("Submission Time", 0)) / 1000,
                "task_s": (acc.get("internal.metrics.executorRunTime") or 0) / 1000,
                "read_mb": (acc.get("internal.metrics.input.bytesRead") or 0) / 1e6,
                "write_mb": (acc.get("internal.metrics.output.bytesWritten") or 0) / 1e6,
                "shuffle_w_mb": (acc.get("internal.metrics.shuffle.write.bytesWritten") or 0) / 1e6,
                "shuffle_r_mb": ((acc.get("internal.metrics.shuffle.read.remoteBytesRead") or 0)
                                 + (acc.get("internal.metrics.shuffle.read.localBytesRead") or 0)) / 1e6,
            }
    stage_job = {sid: j["desc"] for j in jobs.values() for sid in j["stages"]}
    by_desc: dict[str, float] = {}
    for j in jobs.values():
        by_desc[j["desc"]] = by_desc.get(j["desc"], 0.0) + (j.get("end", j["start"]) - j["start"]) / 1000
    lines = [f"{len(jobs)} jobs, {len(stages)} stages; "
             f"sum of job wall times {sum((j.get('end', j['start']) - j['start']) for j in jobs.values()) / 1000:.1f} s"]
    lines.append("\njob wall time by description (concurrent jobs overlap):")
    lines += [f"  {sec:7.1f} s  {desc or '(none)'}" for desc, sec in sorted(by_desc.items(), key=lambda x: -x[1])[:top]]
    lines.append(f"\nslowest {top} stages (wall s, task s, tasks, MB read / written / shuffle written / read):")
    for s in sorted(stages.values(), key=lambda s: -s["wall"])[:top]:
        lines.append(f"  {s['wall']:7.1f} {s['task_s']:7.1f} {s['tasks']:5d}  {s['read_mb']:8.1f} {s['write_mb']:8.1f} "
                     f"{s['shuffle_w_mb']:8.1f} {s['shuffle_r_mb']:8.1f}  stage {s['id']} [{stage_job.get(s['id'], '')}]: "
                     f"{s['name'][:60]}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 25))
