#!/usr/bin/env bash
# Runs the whole migralake test suite (lint + pytest), setting up first if needed.
#   ./test.sh                 everything
#   ./test.sh -k tables       pytest arguments pass through
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
"$ROOT/bin/setup"
"$ROOT/.venv/bin/ruff" check lib jobs tests bench
exec "$ROOT/.venv/bin/python" -m pytest "$@"
