#!/usr/bin/env bash
# The one way to run a migralake job, locally (default) or on a cluster.
#
#   ./spark-submit.sh <job> [--profile NAME] [--conf FILE]... [--set key=value]...
#                     [--period START:END] [--master URL] [job arguments] [-- extra spark-submit args]
#   ./spark-submit.sh --help
#
# Locally it sets up the environment if needed (bin/setup), then runs the job
# with the environment's own spark-submit, the Delta jars from .jars/ and
# lib/ + jobs/ shipped as a zip for --py-files. On a cluster (--master other
# than local[...]) the Delta jars come from --packages instead, and executors
# need the packed Python environment (see the README, "Running on a cluster").
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${MIGRALAKE_VENV:-$ROOT/.venv}"
JARS="${MIGRALAKE_JARS:-$ROOT/.jars}"
PYTHON="${MIGRALAKE_PYTHON:-python3}"
DELTA_PACKAGE="io.delta:delta-spark_4.1_2.13:4.4.0"

# The job registry (jobs/__init__.py, plain Python) read with the system Python: the usage and a wrong
# job name answer at once, before any set-up, on a fresh clone too.
jobs_tool() {  # jobs_tool list | jobs_tool is NAME
  "$PYTHON" - "$ROOT/jobs/__init__.py" "$@" <<'PY'
import difflib, sys
ns: dict = {}
exec(compile(open(sys.argv[1], encoding="utf-8").read(), sys.argv[1], "exec"), ns)
jobs = ns["JOBS"]
width = max(map(len, jobs))
listing = "\n".join(f"  {n:<{width}}  {d}" for n, (_, d) in sorted(jobs.items()))
if sys.argv[2] == "list":
    print(listing)
elif sys.argv[3] not in jobs:
    close = difflib.get_close_matches(sys.argv[3], jobs, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    print(f"spark-submit.sh: unknown job '{sys.argv[3]}'.{hint} Jobs:\n{listing}", file=sys.stderr)
    sys.exit(2)
PY
}

usage() {
  cat <<USAGE
usage: ./spark-submit.sh <job> [--profile NAME] [--conf FILE]... [--set section.key=value]...
                         [--period START:END] [--master URL] [job arguments] [-- spark-submit args]

Runs a migralake job with Spark + Delta. Configuration: conf/base.yaml, then
conf/<profile>.yaml (default: demo), then each --conf FILE, then environment
variables MIGRALAKE__SECTION__KEY, then each --set. The first run sets up the
environment (bin/setup); --help and the job list need nothing.

jobs:
USAGE
  jobs_tool list
}

if [[ $# -eq 0 ]]; then
  echo "spark-submit.sh: no job given" >&2
  usage >&2
  exit 2
fi
if [[ "$1" == "-h" || "$1" == "--help" || "$1" == "help" ]]; then
  usage
  exit 0
fi
if [[ "$1" != -* ]]; then jobs_tool is "$1" || exit 2; fi

"$ROOT/bin/setup" || { echo "spark-submit.sh: set-up failed (see above)" >&2; exit 1; }

# Split our arguments from extra spark-submit arguments after "--".
job_args=()
extra=()
seen_sep=0
for arg in "$@"; do
  if [[ $seen_sep -eq 0 && "$arg" == "--" ]]; then seen_sep=1; continue; fi
  if [[ $seen_sep -eq 0 ]]; then job_args+=("$arg"); else extra+=("$arg"); fi
done

cd "$ROOT"
export MIGRALAKE_HOME="$ROOT"
export PYSPARK_PYTHON="${PYSPARK_PYTHON:-$VENV/bin/python}"
export PYSPARK_DRIVER_PYTHON="${PYSPARK_DRIVER_PYTHON:-$VENV/bin/python}"

# Validate job name, arguments and configuration before any JVM starts.
check="$("$VENV/bin/python" -m jobs.cli check "${job_args[@]}")" || exit $?
read -r master driver_memory < <("$VENV/bin/python" -c 'import json,sys; c=json.load(sys.stdin); print(c["master"], c["driver_memory"])' <<<"$check")

# Ship lib/ and jobs/ to executors.
mkdir -p "$ROOT/build"
zip_path="$ROOT/build/migralake-src.zip"
"$VENV/bin/python" - "$ROOT" "$zip_path" <<'PY'
import os, sys, zipfile
root, out = sys.argv[1], sys.argv[2]
tmp = out + ".tmp"
with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
    for pkg in ("lib", "jobs"):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, pkg)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for name in filenames:
                if name.endswith((".py", ".typed")):
                    full = os.path.join(dirpath, name)
                    zf.write(full, os.path.relpath(full, root))
os.replace(tmp, out)
PY

submit_args=(--master "$master" --name "migralake-${job_args[0]}" --py-files "$zip_path"
             --conf "spark.driver.extraJavaOptions=-Dlog4j.configurationFile=$ROOT/conf/log4j2.properties -Dderby.system.home=$ROOT/build")
if [[ "$master" == local* ]]; then
  jars="$(ls "$JARS"/*.jar | paste -sd, -)"
  submit_args+=(--jars "$jars" --driver-memory "$driver_memory")
else
  submit_args+=(--packages "$DELTA_PACKAGE")
fi

exec "$VENV/bin/spark-submit" "${submit_args[@]}" "${extra[@]}" "$ROOT/jobs/cli.py" run "${job_args[@]}"
