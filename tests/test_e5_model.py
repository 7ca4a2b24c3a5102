"""The offline multilingual sentiment model: the E5S1 loader, the conversion, the cache, bad inputs, the real model.

The loader is checked on a tiny file in the same format that the test writes itself (known weights in
Q4_0 blocks, a known vocabulary and normalisation map): the tensors, the tokenisation and a transformers
round trip must come out exactly as written.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jobs.social import e5_import, train_e5
from jobs.social import model as models
from lib.config import PROJECT_ROOT
from lib.publish import sha256_file

H, LAYERS, HEADS, FFN, MAXP, TVS = 32, 1, 2, 64, 16, 2
PIECES = ["<s>", "<pad>", "</s>", "<unk>", "\u2581", "\u2581mi", "gra", "nt", "\u2581migrant", "s", "\u2581a", "b",
          "\u2581ab", "c", "\u2581c", "é", "\u2581é", "<mask>"]
SCORES = [0.0, 0.0, 0.0, 0.0, -2.0, -3.0, -3.5, -3.0, -4.0, -2.5, -2.0, -2.0, -3.5, -2.0, -2.0, -3.0, -3.0, 0.0]
NORM = {0x07: [], 0xA0: [0x20], 0xE9: [0x65, 0x301]}  # BEL dropped, NBSP a space, and one entry NFKC would not make


def q4_blocks(w: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Q4_0 bytes of ``w`` (rows of whole blocks) and the values they decode to."""
    flat = w.astype(np.float32).reshape(-1, 32)
    out, dec = bytearray(), []
    for block in flat:
        d = np.float16(max(np.abs(block).max() / 7.0, 1e-3))
        q = np.clip(np.rint(block / np.float32(d)), -8, 7).astype(np.int8) + 8
        out += np.array([d], dtype="<f2").tobytes() + bytes(int(q[j]) | (int(q[j + 16]) << 4) for j in range(16))
        dec.append((q.astype(np.float32) - 8) * np.float32(d))
    return bytes(out), np.concatenate(dec).reshape(w.shape)


def write_e5s1(path: Path, seed: int = 0, vocab_rows: int | None = None, truncate: int = 0) -> dict[str, np.ndarray]:
    """A complete tiny E5S1 file; returns the decoded value of every tensor."""
    rng = np.random.default_rng(seed)
    vocab = vocab_rows or len(PIECES) + 2  # two spare embedding rows, as the real file has
    shapes = {"emb.word": (vocab, H), "emb.pos": (MAXP, H), "emb.type": (TVS, H), "emb.ln.w": (H,), "emb.ln.b": (H,)}
    for part, shape in {"q.w": (H, H), "q.b": (H,), "k.w": (H, H), "k.b": (H,), "v.w": (H, H), "v.b": (H,),
                        "ao.w": (H, H), "ao.b": (H,), "aln.w": (H,), "aln.b": (H,), "fi.w": (FFN, H), "fi.b": (FFN,),
                        "fo.w": (H, FFN), "fo.b": (H,), "oln.w": (H,), "oln.b": (H,)}.items():
        shapes[f"l0.{part}"] = shape
    quantised = {"emb.word"} | {n for n in shapes if n.startswith("l0.") and n.endswith(".w") and "ln" not in n}
    blobs, expected = {}, {}
    for name, shape in shapes.items():
        w = rng.normal(0, 0.2, shape).astype(np.float32)
        if name.endswith("ln.w"):
            w = 1 + w * 0.1
        if name in quantised:
            blobs[name], expected[name] = q4_blocks(w)
        else:
            blobs[name], expected[name] = w.astype("<f4").tobytes(), w
    blob = b"".join(p.encode() for p in PIECES)
    offs = np.cumsum([0] + [len(p.encode()) for p in PIECES]).astype("<u4")
    head = b"E5S1" + struct.pack("<I7ifi", 1, H, LAYERS, HEADS, FFN, vocab, MAXP, TVS, 1e-12, 32)
    head += struct.pack("<i4iQ", len(PIECES), 0, 2, 1, 3, len(blob)) + offs.tobytes()
    head += np.array(SCORES, dtype="<f4").tobytes() + blob
    nm = b"".join(struct.pack("<IB", cp, len(out)) + struct.pack(f"<{len(out)}I", *out) for cp, out in NORM.items())
    head += struct.pack("<iI", len(NORM), len(nm)) + nm
    dir_size = sum(2 + len(n) + 1 + 4 + 8 + 8 for n in shapes) + 4
    offset = len(head) + dir_size
    directory, payload = struct.pack("<i", len(shapes)), b""
    for name, shape in shapes.items():
        directory += struct.pack("<H", len(name)) + name.encode() + struct.pack(
            "<BIQQ", 1 if name in quantised else 0, int(np.prod(shape)), offset + len(payload), len(blobs[name]))
        payload += blobs[name]
    data = head + directory + payload
    path.write_bytes(data[:len(data) - truncate] if truncate else data)
    return expected


def test_the_loader_reads_back_exactly_what_was_written(tmp_path):  # type: ignore[no-untyped-def]
    expected = write_e5s1(tmp_path / "tiny.bin")
    f = e5_import.read(tmp_path / "tiny.bin")
    assert (f.hidden, f.layers, f.heads, f.ffn, f.vocab) == (H, LAYERS, HEADS, FFN, len(PIECES) + 2)
    assert f.pieces == PIECES and np.array_equal(f.scores, np.array(SCORES, dtype=np.float32))
    for name, values in expected.items():
        np.testing.assert_array_equal(f.tensor(name), values, err_msg=name)
    # Viterbi over the pieces: the best segmentation by score, with the file's normalisation map applied.
    assert e5_import.reference_tokenize(f, "migrants") == [8, 9]  # "▁migrant" + "s" beats "▁mi gra nt s"
    assert e5_import.reference_tokenize(f, "ab\u00a0\u0007c") == [12, 14]  # NBSP -> space, BEL dropped
    assert e5_import.reference_tokenize(f, "  ab") == [12]  # leading spaces collapse into one metaspace
    assert e5_import.reference_tokenize(f, "x") == [4, 3]  # "▁" then the unknown character


def test_the_transformers_directory_reproduces_weights_and_tokens(tmp_path):  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoTokenizer, BertModel

    expected = write_e5s1(tmp_path / "tiny.bin", seed=1)
    f = e5_import.read(tmp_path / "tiny.bin")
    e5_import.write_transformers(f, tmp_path / "hf")
    model = BertModel.from_pretrained(tmp_path / "hf", add_pooling_layer=False)
    sd = model.state_dict()
    np.testing.assert_array_equal(sd["embeddings.word_embeddings.weight"].numpy(), expected["emb.word"])
    np.testing.assert_array_equal(sd["encoder.layer.0.intermediate.dense.weight"].numpy(), expected["l0.fi.w"])
    np.testing.assert_array_equal(sd["encoder.layer.0.output.LayerNorm.bias"].numpy(), expected["l0.oln.b"])
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in ("migrants", "ab\u00a0\u0007c", "  ab", "x", "ab c", "migrants ab"):
        assert tok(text)["input_ids"] == [0, *e5_import.reference_tokenize(f, text), 2], text
    with torch.inference_mode():
        out = model(**tok(["migrants ab"], return_tensors="pt")).last_hidden_state
    assert out.shape == (1, 5, H) and torch.isfinite(out).all()


@pytest.mark.parametrize(("damage", "message"), [
    ("truncate", "past the end of the file"),
    ("vocab", "18 vocabulary pieces but an embedding matrix of 10 rows"),
    ("magic", "not an E5S1 encoder file"),
])
def test_a_damaged_file_is_a_clear_error(tmp_path, damage, message):  # type: ignore[no-untyped-def]
    path = tmp_path / "bad.bin"
    if damage == "truncate":
        write_e5s1(path, truncate=7)  # the last weight block is cut short
    elif damage == "vocab":
        write_e5s1(path, vocab_rows=10)
    else:
        write_e5s1(path)
        path.write_bytes(b"GGUF" + path.read_bytes()[4:])
    with pytest.raises(e5_import.E5FormatError, match=message) as err:
        e5_import.read(path)
    assert str(path) in str(err.value)


def test_a_corrupt_wheel_stops_the_build_and_leaves_no_model_behind(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / train_e5.WHEEL).write_bytes(b"not the wheel")
    out = tmp_path / "model"
    with pytest.raises(train_e5.SetupError, match=f"{train_e5.WHEEL}: SHA-256 .* expected {train_e5.WHEEL_SHA256}"):
        train_e5.build(tmp_path, out, train_e5.SETTINGS, downloads)
    assert not out.exists() and not out.with_name("model.partial").exists()


REAL = PROJECT_ROOT / "models" / "sentiment-e5-umsab"
needs_real = pytest.mark.skipif(not (REAL / "training_report.json").exists(),
                                reason=f"{REAL} not built (bin/setup builds it when ../shared/data is present)")


@needs_real
def test_the_cached_model_is_reused_not_trained_again(tmp_path):  # type: ignore[no-untyped-def]
    env = {**os.environ, "MIGRALAKE_CACHE": str(Path(os.readlink(REAL)).parents[1])}
    link = tmp_path / "models" / "sentiment-e5-umsab"
    code = ("import sys; from pathlib import Path; from jobs.social import train_e5; "
            f"t, built = train_e5.ensure(train_e5.DEFAULT_DATA, link=Path({str(link)!r})); print(built, t)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=PROJECT_ROOT, timeout=120)
    built, target = out.stdout.split()
    assert built == "False" and Path(target) == Path(os.readlink(REAL))
    assert (link / "model.safetensors").exists()
    # Readable by executors running as another user (safetensors writes 0600).
    assert all(f.stat().st_mode & 0o444 == 0o444 for f in Path(target).iterdir())
    setup = subprocess.run([str(PROJECT_ROOT / "bin" / "setup")], capture_output=True, text=True, timeout=300)
    assert setup.returncode == 0 and "building the offline sentiment model" not in setup.stderr


@needs_real
def test_the_real_model_gets_obvious_posts_right_in_four_languages() -> None:
    report = json.loads((REAL / "training_report.json").read_text())
    assert report["encoder"]["wheel_sha256"] == train_e5.WHEEL_SHA256
    assert report["encoder"]["conversion"]["check"]["token_ids_equal"] is True
    assert report["weights_sha256"] == sha256_file(REAL / "model.safetensors")
    scorer = models.Scorer(str(REAL), precision="fp32")
    posts = {
        "positive": ["Welcome to all the refugees, we are so happy to help you!",
                     "¡Qué alegría ver a las familias migrantes recibidas con tanto cariño!",
                     "Quelle belle journée, merci à tous les bénévoles pour leur accueil formidable !",
                     "Wir freuen uns sehr, die Flüchtlinge hier willkommen zu heißen. Wunderbar!"],
        "negative": ["This is a disaster, the refugees are left to die in terrible conditions.",
                     "Es horrible y vergonzoso cómo tratan a los migrantes en la frontera.",
                     "C'est une honte, les réfugiés souffrent dans des conditions atroces.",
                     "Das ist furchtbar, die Menschen an der Grenze leiden schrecklich."],
    }
    s = scorer.score(posts["positive"] + posts["negative"])
    assert list(s.label) == ["positive"] * 4 + ["negative"] * 4


def tiny_training(tmp_path: Path, seed: int) -> None:
    """A tiny encoder in ``tmp_path/hf`` and a 24-tweet English training split in ``tmp_path/umsab``."""
    write_e5s1(tmp_path / "tiny.bin", seed=seed)
    e5_import.write_transformers(e5_import.read(tmp_path / "tiny.bin"), tmp_path / "hf")
    data = tmp_path / "umsab" / "english"
    data.mkdir(parents=True)
    texts = ["migrants ab", "ab c", "é migrants", "c ab ab", "migrants", "ab", "c c", "é ab c"] * 3
    (data / "train_text.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    (data / "train_labels.txt").write_text("\n".join(str(i % 3) for i in range(len(texts))) + "\n")


def test_members_are_averaged_into_one_model(tmp_path):  # type: ignore[no-untyped-def]
    """``members: 2`` saves the uniform average of the two members' weights (seeds s and s + 1), each member
    being what a one-member run with its seed saves: checked on a tiny encoder and a tiny training split."""
    from safetensors.numpy import load_file

    tiny_training(tmp_path, seed=2)
    settings = {**train_e5.SETTINGS, "epochs": 1.0, "batch": 8, "lr": 1e-3, "warmup": 0.0}

    def trained(name: str, **changes: object) -> dict[str, np.ndarray]:
        train_e5.finetune(tmp_path / "hf", tmp_path / "umsab", tmp_path / name, {**settings, **changes},
                          languages=("english",))
        return load_file(str(tmp_path / name / "model.safetensors"))

    a, b = trained("a", seed=7), trained("b", seed=8)
    soup = trained("soup", seed=7, members=2)
    assert soup.keys() == a.keys()
    moved = [k for k in a if not np.array_equal(a[k], b[k])]
    assert "classifier.weight" in moved and len(moved) > 10  # the two members really differ
    for k in a:
        np.testing.assert_allclose(soup[k], (a[k] + b[k]) / 2, rtol=1e-5, atol=1e-6, err_msg=k)
    # The frozen word embeddings are the encoder's in every member, so in the average too.
    np.testing.assert_array_equal(soup["bert.embeddings.word_embeddings.weight"],
                                  a["bert.embeddings.word_embeddings.weight"])


def test_fast_dropout_drops_at_the_rate_asked_in_every_lane() -> None:
    """Each 64-bit random word serves four elements: every one of the four lanes must be dropped at rate p
    (a word drawn from a non-negative range would never drop its top lane), kept elements are scaled so the
    expectation is unchanged, and the gradient is the same mask."""
    import torch

    torch.manual_seed(3)
    x = torch.ones(1 << 20, requires_grad=True)
    y = train_e5.fast_dropout(x, 0.1)
    dropped = (y == 0).reshape(-1, 4).float().mean(dim=0)
    assert torch.allclose(dropped, torch.full((4,), 0.1), atol=0.004), dropped  # sd 0.0006 per lane
    kept = y[y != 0]
    assert torch.all(kept == 65536 / (65536 - round(0.1 * 65536)))
    assert abs(float(y.mean()) - 1.0) < 0.003
    y.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, y.detach())
    assert not torch.equal(train_e5.fast_dropout(torch.ones(64), 0.5), train_e5.fast_dropout(torch.ones(64), 0.5))


def test_the_training_attention_equals_sdpa_and_the_saved_model_is_standard(tmp_path):  # type: ignore[no-untyped-def]
    """With dropout too small to drop anything, the training forward pass (the attention written out with
    :func:`fast_dropout`, padded batches included) equals the evaluation pass through torch's SDPA; the
    model saved after training loads as a plain transformers model."""
    import torch
    from transformers import BertForSequenceClassification

    write_e5s1(tmp_path / "tiny.bin", seed=4)
    e5_import.write_transformers(e5_import.read(tmp_path / "tiny.bin"), tmp_path / "hf")
    model = BertForSequenceClassification.from_pretrained(tmp_path / "hf", num_labels=3)
    ids = torch.tensor([[0, 5, 6, 7, 9, 2], [0, 12, 2, 1, 1, 1]])
    mask = (ids != 1).long()
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 1e-9  # rounds to no 1/65536 step: nothing dropped, scale 1
    model.config.attention_probs_dropout_prob = 1e-9
    for layer in model.bert.encoder.layer:
        layer.attention.self.dropout.p = 1e-9
    train_e5.use_fast_dropout(model)
    model.train()
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    assert model.config._attn_implementation != "sdpa"  # the written-out attention ran
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    train_e5.restore_attention(model)
    model.save_pretrained(tmp_path / "saved")
    assert "migralake" not in (tmp_path / "saved" / "config.json").read_text()
    again = BertForSequenceClassification.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, attention_mask=mask).logits, expected)


def test_frozen_layers_keep_their_weights(tmp_path):  # type: ignore[no-untyped-def]
    """``freeze_layers: 1`` on a one-layer encoder: the embeddings and the layer leave training unchanged,
    while without it they are trained."""
    from safetensors.numpy import load_file

    tiny_training(tmp_path, seed=5)
    settings = {**train_e5.SETTINGS, "epochs": 1.0, "batch": 8, "lr": 1e-3, "warmup": 0.0}
    out = {}
    for frozen in (0, 1):
        train_e5.finetune(tmp_path / "hf", tmp_path / "umsab", tmp_path / f"f{frozen}",
                          {**settings, "freeze_layers": frozen}, languages=("english",))
        out[frozen] = load_file(str(tmp_path / f"f{frozen}" / "model.safetensors"))
    encoder = load_file(str(tmp_path / "hf" / "model.safetensors"))
    below = [k for k in out[1] if k.startswith(("bert.embeddings.", "bert.encoder.layer.0."))]
    assert len(below) > 10
    for k in below:
        np.testing.assert_array_equal(out[1][k], encoder[k.removeprefix("bert.")], err_msg=k)
        if "word_embeddings" not in k:
            assert not np.array_equal(out[0][k], out[1][k]), k  # trained when not frozen
    with pytest.raises(ValueError, match="freeze_layers 2: the encoder has 1 layers"):
        train_e5.finetune(tmp_path / "hf", tmp_path / "umsab", tmp_path / "f2", {**settings, "freeze_layers": 2},
                          languages=("english",))
    with pytest.raises(ValueError, match="freeze_layers -1: a number of layers"):
        train_e5.finetune(tmp_path / "hf", tmp_path / "umsab", tmp_path / "fn", {**settings, "freeze_layers": -1},
                          languages=("english",))


def test_members_branched_after_a_shared_epoch(tmp_path):  # type: ignore[no-untyped-def]
    """``branch_at: 1``: the second member continues the first member's run from the end of its first epoch
    (weights, optimiser moments, schedule), with its own seed, and the saved model is the average of the two."""
    from safetensors.numpy import load_file

    tiny_training(tmp_path, seed=6)
    settings = {**train_e5.SETTINGS, "epochs": 2.0, "batch": 8, "lr": 1e-3, "warmup": 0.0, "seed": 7}
    hf, umsab, langs = tmp_path / "hf", tmp_path / "umsab", ("english",)

    first, _, _, trunk = train_e5._finetune_one(hf, umsab, settings, langs, snapshot_epoch=1)
    assert trunk is not None and trunk["step"] == 3  # 24 tweets in batches of 8: an epoch is 3 steps
    second, _, _, _ = train_e5._finetune_one(hf, umsab, {**settings, "seed": 8}, langs, start=trunk)
    scratch, _, _, _ = train_e5._finetune_one(hf, umsab, {**settings, "seed": 8}, langs)
    train_e5.finetune(hf, umsab, tmp_path / "soup", {**settings, "members": 2, "branch_at": 1}, languages=langs)
    soup = load_file(str(tmp_path / "soup" / "model.safetensors"))
    a, b, c = ({k: v.detach().numpy() for k, v in m.state_dict().items()} for m in (first, second, scratch))
    for k in soup:
        np.testing.assert_allclose(soup[k], (a[k] + b[k]) / 2, rtol=1e-5, atol=1e-6, err_msg=k)
    # The branch is not a fresh run with its seed (it started from the shared epoch), and not the first member.
    assert not np.allclose(b["classifier.weight"], c["classifier.weight"])
    assert not np.allclose(b["classifier.weight"], a["classifier.weight"])
    # Its head started from the trunk's: closer to the first member's than a fresh run's is.
    assert np.abs(b["classifier.weight"] - a["classifier.weight"]).sum() < \
        np.abs(c["classifier.weight"] - a["classifier.weight"]).sum()
    with pytest.raises(ValueError, match="branch_at"):
        train_e5.finetune(hf, umsab, tmp_path / "bad", {**settings, "members": 2, "branch_at": 2}, languages=langs)
