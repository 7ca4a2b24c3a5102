"""Command line of the job runner (called by ./spark-submit.sh; usable as ``python -m jobs.cli``).

    python -m jobs.cli list                      one line per job
    python -m jobs.cli check JOB [options]       validate job name and config, no Spark
    python -m jobs.cli run JOB [options]         build the session and run the job

Options: ``--profile NAME`` (default demo), ``--conf FILE`` (repeatable),
``--set section.key=value`` (repeatable), ``--period START:END``,
``--master URL``; anything after the options belongs to the job (e.g.
``release cdr_presence``). Errors exit with status 2 and one clear message.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from collections.abc import Sequence
from types import ModuleType

from jobs import JOBS
from lib.config import Config, ConfigError, load_config

log = logging.getLogger("migralake")


class UsageError(ValueError):
    pass


def job_list() -> str:
    width = max(len(n) for n in JOBS)
    return "\n".join(f"  {name:<{width}}  {desc}" for name, (_, desc) in sorted(JOBS.items()))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spark-submit.sh", add_help=False)
    p.add_argument("job")
    p.add_argument("--profile", default="demo")
    p.add_argument("--conf", action="append", default=[], metavar="FILE")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    p.add_argument("--period", default=None, metavar="START:END")
    p.add_argument("--master", default=None)
    return p


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = _parser()
    parser.error = lambda message: (_ for _ in ()).throw(UsageError(message))  # type: ignore[method-assign]
    args, rest = parser.parse_known_args(list(argv))
    if args.job not in JOBS:
        import difflib

        close = difflib.get_close_matches(args.job, JOBS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UsageError(f"unknown job '{args.job}'.{hint} Jobs:\n{job_list()}")
    overrides = list(args.overrides)
    if args.period:
        start, sep, end = args.period.partition(":")
        if not sep or not start or not end:
            raise UsageError(f"--period {args.period}: expected START:END, e.g. 2024-03-01:2024-03-31")
        overrides += [f"period.start={start}", f"period.end={end}"]
    if args.master:
        overrides.append(f"spark.master={args.master}")
    args.overrides = overrides
    return args, rest


def load_job(job: str) -> ModuleType:
    module_name = JOBS[job][0]
    module = importlib.import_module(module_name)
    if not callable(getattr(module, "run", None)):
        raise UsageError(f"job module {module_name} has no run(spark, cfg)")
    return module


def job_arguments(job: str, rest: list[str]) -> argparse.Namespace | None:
    module = load_job(job)
    if not hasattr(module, "add_arguments"):
        if rest:
            raise UsageError(f"job '{job}' takes no arguments (got {' '.join(rest)})")
        return None
    parser = argparse.ArgumentParser(prog=f"spark-submit.sh {job}")
    module.add_arguments(parser)
    parser.error = lambda message: (_ for _ in ()).throw(UsageError(f"{job}: {message}"))  # type: ignore[method-assign]
    return parser.parse_args(rest)


def prepare(argv: Sequence[str]) -> tuple[argparse.Namespace, Config, argparse.Namespace | None]:
    args, rest = parse(argv)
    cfg = load_config(profile=args.profile, conf_files=args.conf, overrides=args.overrides)
    job_args = job_arguments(args.job, rest)
    return args, cfg, job_args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help", "list"}:
        print(job_list())
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command == "check":
            args, cfg, _ = prepare(rest)
            print(json.dumps({"job": args.job, "master": cfg.spark.master, "driver_memory": cfg.spark.driver_memory}))
            return 0
        if command == "run":
            return _run(rest)
        raise UsageError(f"unknown command '{command}' (use list, check or run)")
    except (UsageError, ConfigError) as exc:
        print(f"migralake: error: {exc}", file=sys.stderr)
        return 2


def _run(argv: Sequence[str]) -> int:
    from lib.runtime import RUN, JobFailed, configure_logging
    from lib.spark import SetupError, get_spark

    configure_logging()
    args, cfg, job_args = prepare(argv)
    module = load_job(args.job)
    start = time.perf_counter()
    try:
        spark = get_spark(cfg.spark, master=args.master)
    except SetupError as exc:
        print(f"migralake: error: {exc}", file=sys.stderr)
        return 3
    sc_conf = spark.sparkContext.getConf()
    log.info("job %s: profile=%s master=%s app=%s driver_memory=%s lakehouse=%s", args.job, cfg.profile,
             spark.sparkContext.master, spark.sparkContext.appName, sc_conf.get("spark.driver.memory", "1g"),
             cfg.lakehouse.resolved_root())
    try:
        result = module.run(spark, cfg, job_args) if job_args is not None else module.run(spark, cfg)
    except JobFailed as exc:
        log.error("job %s failed after %.1f s", args.job, time.perf_counter() - start)
        print(f"migralake: error: {exc}", file=sys.stderr)
        return exc.exit_code
    log.info("job %s: done in %.1f s (%d stages)", args.job, time.perf_counter() - start, len(RUN.stages))
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
