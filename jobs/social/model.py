"""Sentiment classifiers: load a Hugging Face sequence-classification model and score texts.

One loading path serves every model: a hub id (production default
``cardiffnlp/twitter-xlm-roberta-base-sentiment``, needs the hub or its cache) or
a local transformers model directory (the offline default
``models/sentiment-e5-umsab``, built by ``jobs/social/train_e5.py`` from the
multilingual-e5-small encoder on PyPI, fine-tuned on UMSAB). The model's
own ``config.id2label`` is mapped to negative / neutral / positive; a model
whose labels carry no such names needs ``social.label_map`` in conf/.

``Scorer`` is what Spark executors hold: one per Python worker (see
``scorer_for``), scoring a batch sorted by token length, truncated to the
model's maximum, with ``torch.inference_mode``, at a numeric precision of
``social.precision``: ``fp32``; ``bf16`` (torch autocast: matrix products in
bfloat16, layer norms and softmax in float32; fast only on CPUs with native
bfloat16 instructions, AVX512-BF16 or AMX); ``int8`` (dynamic quantisation of
the linear layers); ``auto`` = bf16 where the CPU has native bfloat16, else
fp32. Each scored row records the precision used.

Reads and writes no tables.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lib.config import PROJECT_ROOT

LABELS = ("negative", "neutral", "positive")
OFFLINE_DEFAULT = "models/sentiment-e5-umsab"
_SYNONYMS = {
    "negative": "negative", "neg": "negative", "0": "negative",
    "neutral": "neutral", "neu": "neutral", "1": "neutral",
    "positive": "positive", "pos": "positive", "2": "positive",
}


PRECISIONS = ("auto", "fp32", "bf16", "int8")


def native_bf16() -> bool:
    """True when this CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX-BF16)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(precision: str) -> str:
    """The precision actually used: ``auto`` becomes bf16 or fp32 for this CPU."""
    if precision not in PRECISIONS:
        raise ModelError(f"social.precision '{precision}' is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if native_bf16() else "fp32"
    return precision


class ModelError(RuntimeError):
    """A model that cannot be loaded or whose labels cannot be mapped; the message says why."""


def resolve(name: str) -> str:
    """A local directory (absolute, or relative to the project root) or else the hub id as given."""
    p = Path(name)
    if p.is_absolute():
        return str(p)
    local = PROJECT_ROOT / p
    if local.exists() or name.startswith(("models/", "./", "../")):
        return str(local)
    return name


def weights_hash(name: str) -> str:
    """SHA-256 over the model's weight files (sorted by name); identifies exactly what scored a row."""
    path = Path(resolve(name))
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        try:  # the local Hugging Face cache first, then the hub (when reachable)
            path = Path(snapshot_download(name, local_files_only=True))
        except Exception:  # noqa: BLE001 - hub errors come in many types
            try:
                path = Path(snapshot_download(name))
            except Exception as exc:  # noqa: BLE001
                raise ModelError(f"model {name}: not a local directory, not in the Hugging Face cache, and the "
                                 f"hub cannot be reached ({type(exc).__name__}); download it where the hub is "
                                 "reachable, or name a local model directory") from None
    files = sorted(f for f in path.iterdir() if f.suffix in (".safetensors", ".bin") and f.is_file())
    if not files:
        raise ModelError(f"model {name}: no weight files (*.safetensors, *.bin) in {path}")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def label_order(id2label: dict[int, str], label_map: dict[str, str] | None = None) -> list[int]:
    """Indices of the model's outputs for negative, neutral, positive (neutral may be -1 when absent)."""
    label_map = {str(k).lower(): v for k, v in (label_map or {}).items()}
    found: dict[str, int] = {}
    for idx, raw in sorted(id2label.items()):
        name = str(raw).strip().lower()
        ours = label_map.get(name) or _SYNONYMS.get(name)
        if ours is None:
            raise ModelError(f"model label {idx} '{raw}' is not negative/neutral/positive; map the model's labels "
                             f"with social.label_map (e.g. {{'{raw}': 'negative'}}); labels: {id2label}")
        if ours not in LABELS:
            raise ModelError(f"social.label_map maps '{raw}' to '{ours}'; expected one of {LABELS}")
        if ours in found:
            raise ModelError(f"model labels {found[ours]} and {idx} both map to {ours}: {id2label}")
        found[ours] = idx
    if "negative" not in found or "positive" not in found:
        raise ModelError(f"model labels {id2label} give no negative and positive class")
    return [found["negative"], found.get("neutral", -1), found["positive"]]


@dataclass
class Scores:
    label: np.ndarray  # object: negative / neutral / positive
    prob: np.ndarray  # probability of that label
    p_negative: np.ndarray
    p_neutral: np.ndarray
    p_positive: np.ndarray


class Scorer:
    """A loaded tokenizer + model; ``score`` classifies a list of texts in length-sorted batches."""

    def __init__(self, name: str, label_map: dict[str, str] | None = None, threads: int | None = None,
                 precision: str = "fp32") -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        where = resolve(name)
        local = Path(where).is_dir()
        if not local and (where.startswith("/") or name.startswith(("models/", "./", "../"))):
            raise ModelError(f"model directory {where} does not exist"
                             + (" (bin/setup builds it: jobs/social/train_e5.py)" if where == resolve(OFFLINE_DEFAULT) else ""))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=local or None)
            model = AutoModelForSequenceClassification.from_pretrained(where, local_files_only=local or None)
        except OSError as exc:
            raise ModelError(f"model {name}: cannot load a sequence-classification model ({exc})") from None
        model.eval()
        self.precision = resolve_precision(precision)
        if self.precision == "int8":
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        self.model = model
        self.name = name
        self.order = label_order(model.config.id2label, label_map)
        limit = getattr(self.tokenizer, "model_max_length", None) or 512
        positions = getattr(model.config, "max_position_embeddings", None) or limit
        # RoBERTa-style position ids start after the padding index: two fewer usable positions.
        self.max_length = int(min(limit, positions - (2 if model.config.model_type in ("roberta", "xlm-roberta") else 0)))

    def score(self, texts: list[str], batch_size: int = 64) -> Scores:
        import torch

        n = len(texts)
        probs = np.zeros((n, 3), dtype=np.float64)
        if n:
            enc = self.tokenizer(texts, truncation=True, max_length=self.max_length, add_special_tokens=True)
            lengths = np.array([len(ids) for ids in enc["input_ids"]])
            order = np.argsort(lengths, kind="stable")  # similar lengths share a batch: little padding
            autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if self.precision == "bf16"
                        else contextlib.nullcontext())
            with torch.inference_mode(), autocast:
                for start in range(0, n, batch_size):
                    idx = order[start:start + batch_size]
                    batch = self.tokenizer.pad({k: [enc[k][i] for i in idx] for k in enc},
                                               return_tensors="pt")
                    logits = self.model(**batch).logits.float()
                    p = torch.softmax(logits, dim=-1).numpy()
                    for j, col in enumerate(self.order):
                        if col >= 0:
                            probs[idx, j] = p[:, col]
        best = probs.argmax(axis=1)
        return Scores(label=np.array(LABELS, dtype=object)[best], prob=probs[np.arange(n), best],
                      p_negative=probs[:, 0], p_neutral=probs[:, 1], p_positive=probs[:, 2])


PRELOAD_MODEL_ENV = "MIGRALAKE_SENTIMENT_MODEL"


def worker_preload() -> None:
    """Import torch, transformers and the model's own classes (not its weights) in the worker daemon.

    Called by ``lib.pydaemon`` before it forks the Python workers, for the model
    named by ``$MIGRALAKE_SENTIMENT_MODEL``: every worker then starts with these
    imports done (several seconds each) and only reads the weights.
    """
    where = os.environ.get(PRELOAD_MODEL_ENV)
    if not where:
        return
    import torch  # noqa: F401
    from transformers import AutoConfig, AutoTokenizer  # noqa: F401
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    config = AutoConfig.from_pretrained(where, local_files_only=Path(where).is_dir() or None)
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)]  # imports the model's module


_CACHE: dict[tuple, Scorer] = {}
_LOCK = threading.Lock()


def scorer_for(name: str, label_map: dict[str, str] | None = None, threads: int | None = None,
               precision: str = "fp32") -> Scorer:
    """The worker's scorer for this model, loaded on first use and kept for the worker's life."""
    key = (resolve(name), tuple(sorted((label_map or {}).items())), threads, precision, os.getpid())
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = Scorer(name, label_map, threads, precision)
        return _CACHE[key]
