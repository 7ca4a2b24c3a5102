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
# than local[...]) the same jars are shipped (--jars; MIGRALAKE_DELTA=packages
# resolves them with --packages instead), and executors need the packed Python
# environment (bin/pack-env; see the README, "Running on a cluster").
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

# A spark://host:port master that does not answer fails now, with a hint, not after a minute of retries.
if [[ "$master" == spark://* ]]; then
  "$VENV/bin/python" - "$master" <<'PY' || exit 1
import socket, sys
url = sys.argv[1]
for hostport in url[len("spark://"):].split(","):
    host, _, port = hostport.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        sys.exit(0)
    except (OSError, ValueError) as exc:
        reason = exc.strerror or str(exc) if isinstance(exc, OSError) else f"bad port '{port}'"
print(f"spark-submit.sh: no Spark master answers at {url} ({reason}). Start one (bin/cluster start for a "
      "loopback cluster on this machine) or give the right --master.", file=sys.stderr)
sys.exit(1)
PY
fi

# Driver and executors log through conf/log4j2.properties (executors read it at this path: same machine or a
# shared file system; elsewhere they keep Spark's default until the driver's level reaches them through
# spark.executor.syncLogLevel.enabled, set by lib/spark.py).
submit_args=(--master "$master" --name "migralake-${job_args[0]}" --py-files "$zip_path"
             --driver-memory "$driver_memory"
             --conf "spark.driver.extraJavaOptions=-Dlog4j.configurationFile=$ROOT/conf/log4j2.properties -Dderby.system.home=$ROOT/build"
             --conf "spark.executor.extraJavaOptions=-Dlog4j.configurationFile=$ROOT/conf/log4j2.properties")
# Executors on the packed environment of bin/pack-env (MIGRALAKE_EXECUTOR_ENV=<archive>): unpacked by Spark
# as ./environment in each executor's folder; the driver keeps this checkout's environment.
if [[ -n "${MIGRALAKE_EXECUTOR_ENV:-}" ]]; then
  [[ -f "$MIGRALAKE_EXECUTOR_ENV" ]] || { echo "spark-submit.sh: MIGRALAKE_EXECUTOR_ENV: no file $MIGRALAKE_EXECUTOR_ENV (bin/pack-env makes it)" >&2; exit 1; }
  submit_args+=(--archives "$MIGRALAKE_EXECUTOR_ENV#environment"
                --conf "spark.pyspark.python=./environment/bin/python"
                --conf "spark.pyspark.driver.python=$PYSPARK_DRIVER_PYTHON")
fi
# The Delta jars: those of $MIGRALAKE_JARS (.jars/, resolved once by bin/setup; offline), for every master.
# MIGRALAKE_DELTA=packages asks spark-submit to resolve them from Maven Central (or the mirror of the
# cluster's Ivy settings) instead.
if [[ "${MIGRALAKE_DELTA:-jars}" == packages ]]; then
  submit_args+=(--packages "$DELTA_PACKAGE")
else
  compgen -G "$JARS/*.jar" >/dev/null || { echo "spark-submit.sh: no jars in $JARS (run bin/setup, or set MIGRALAKE_JARS, or MIGRALAKE_DELTA=packages)" >&2; exit 1; }
  submit_args+=(--jars "$(ls "$JARS"/*.jar | paste -sd, -)")
fi

exec "$VENV/bin/spark-submit" "${submit_args[@]}" "${extra[@]}" "$ROOT/jobs/cli.py" run "${job_args[@]}"
