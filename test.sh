#!/usr/bin/env bash
# Runs the whole migralake test suite (lint, type check, pytest), setting up first if needed.
#   ./test.sh                 everything
#   ./test.sh -k tables       pytest arguments pass through
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
"$ROOT/bin/setup"
"${MIGRALAKE_VENV:-$ROOT/.venv}/bin/ruff" check lib jobs tests bench
"${MIGRALAKE_VENV:-$ROOT/.venv}/bin/mypy"   # lib, jobs and bench with the pydantic plugin (pyproject.toml)
exec "${MIGRALAKE_VENV:-$ROOT/.venv}/bin/python" -m pytest "$@"
