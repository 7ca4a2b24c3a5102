"""Social benchmark: sentiment scoring through the Spark pipeline vs one post at a time in one process.

    ./bench/run social [--posts N] [--batch-size B] [--precision P] [--workdir DIR]

1. Generates about N synthetic posts about migration in eight languages (seeded;
   the demo generator with every post on topic) and ingests them into bronze
   (not timed).
2. Runs ``social.sentiment`` on Spark with the offline default model and times
   its scoring stage: bronze read, language, topic, place and sentiment on the
   executors through Arrow batches (one model per Python worker, length-sorted
   batches; the workers' daemon importing torch and transformers and the model
   loading are inside the timing), silver written to Delta (spark_seconds); the whole job with gold
   series and the retention step is reported too (spark_pipeline_seconds). The
   precision is ``social.precision`` (default auto: bf16 where the CPU has native
   bfloat16, else fp32), or --precision.
3. Baseline, in the same run on the same posts: a transformers
   ``pipeline("text-classification")`` over the same model directory, scoring one
   post at a time in this process (torch with every core), after the same
   preprocessing and truncation, in float32.
4. Label agreement: the Spark label and the baseline label of each post.
5. The model's own ceiling on this machine: ``Scorer.score`` alone (same precision, batch size and
   length sorting, one thread) on a sample of the posts in this process, times the task slots: what
   the Spark stage would reach with no cost besides the model. ``ratio_ceiling`` is that rate over the
   baseline's: no pipeline can beat it without changing the model's arithmetic.

Prints progress to stderr and, last, one JSON object: posts, spark_seconds, spark_pipeline_seconds,
baseline_seconds, spark_posts_per_second, baseline_posts_per_second, ratio (Spark
rate / baseline rate), label_agreement, model_ceiling_posts_per_second, ratio_ceiling, model, precision,
batch_size, cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from datetime import date
from pathlib import Path

from jobs.demo import social_synth
from jobs.social import ingest, sentiment
from jobs.social import model as models
from lib.config import PROJECT_ROOT, SocialInput, load_config
from lib.runtime import RUN, configure_logging
from lib.spark import get_spark, to_pandas
from lib.tables import Lakehouse


def baseline(model_dir: str, texts: list[str]) -> tuple[list[str], float]:
    import torch
    from transformers import pipeline

    torch.set_num_threads(os.cpu_count() or 1)
    clf = pipeline("text-classification", model=model_dir, tokenizer=model_dir, device=-1)
    id2label = {int(k): str(v) for k, v in (clf.model.config.id2label or {}).items()}
    order = models.label_order(id2label)
    names = {id2label[i]: lab for i, lab in zip(order, models.LABELS, strict=True) if i >= 0}
    clf(texts[0], truncation=True)  # warm-up, not timed (the Spark side loads its model inside the timing)
    t0 = time.perf_counter()
    labels = [names[clf(t, truncation=True)[0]["label"]] for t in texts]
    return labels, time.perf_counter() - t0


def ceiling(model_dir: str, texts: list[str], precision: str, batch_size: int, slots: int) -> float:
    """Posts per second of the scorer alone, one thread, times ``slots`` (an upper bound for the Spark stage)."""
    scorer = models.Scorer(model_dir, threads=1, precision=precision)
    scorer.score(texts[:batch_size], batch_size=batch_size)  # warm-up
    t0 = time.perf_counter()
    scorer.score(texts, batch_size=batch_size)
    return slots * len(texts) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/run social", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--posts", type=int, default=24000,
                   help="about this many posts to score (default 24000; fewer leave the fixed cost of the "
                   "Spark stage, about 10 s, a larger share)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", choices=models.PRECISIONS, default=None,
                   help="Spark side: auto (bf16 on CPUs with native bfloat16, else fp32), fp32, bf16 or int8 "
                   "(default: social.precision of the demo profile)")
    p.add_argument("--workdir", default="build/bench/social")
    args = p.parse_args(argv)
    configure_logging("INFO")
    work = Path(args.workdir)
    work = work if work.is_absolute() else PROJECT_ROOT / work
    shutil.rmtree(work, ignore_errors=True)
    os.environ.setdefault("MIGRALAKE_PSEUDONYM_KEY", "bench-only-key-0123456789abcdef")
    print(f"[bench] generating {args.posts} posts ...", file=sys.stderr)
    # ~8% of lines are retweets/duplicates: they are scored too (flagged, not counted), so count what is scored.
    social_synth.generate(work / "synth", seed=7, n_authors=max(10, args.posts // 4), posts_per_author=4.0,
                          start=date(2024, 3, 4), n_days=28, event_day=14, on_topic_share=1.0)
    cfg = load_config(profile="demo", overrides=[f"lakehouse.root={work / 'lake'}", "spark.show_progress=false",
                                                 "period.start=2024-03-04", "period.end=2024-03-31"])
    cfg = cfg.model_copy(update={"social": cfg.social.model_copy(update={
        "inputs": [SocialInput(path=str(work / "synth" / "posts"))], "spatial_unit": "h3_5",
        "batch_size": args.batch_size, **({"precision": args.precision} if args.precision else {})})})
    spark = get_spark(cfg.spark)
    ingest.ingest(spark, cfg)
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    cores = spark.sparkContext.defaultParallelism
    print(f"[bench] Spark scoring on {cores} task slots ...", file=sys.stderr)
    t0 = time.perf_counter()
    out = sentiment.score(spark, cfg)
    pipeline_s = time.perf_counter() - t0
    scoring = [s for s in RUN.stages if s.name == "social.sentiment -> silver.social_posts"][-1]
    spark_s = scoring.seconds
    silver = to_pandas(lake.read("silver.social_posts").filter("on_topic").select("post_key", "sentiment",
                                                                                    "model_precision"))
    used = sorted(silver["model_precision"].dropna().unique().tolist())
    bronze = to_pandas(lake.read("bronze.social_posts").select("post_key", "text")).drop_duplicates("post_key")
    posts = bronze.merge(silver, on="post_key", how="inner")
    spark.stop()
    print(f"[bench] baseline: one post at a time, {len(posts)} posts ...", file=sys.stderr)
    labels, base_s = baseline(str(models.resolve(cfg.social.model)),
                              [sentiment.for_model(t) for t in posts["text"]])
    agree = float((posts["sentiment"].to_numpy() == labels).mean())
    n = len(posts)
    sample = [sentiment.for_model(t) for t in posts["text"].sample(n=min(n, 4000), random_state=1)]
    print(f"[bench] the model's ceiling: {len(sample)} posts, one thread ...", file=sys.stderr)
    top = ceiling(str(models.resolve(cfg.social.model)), sample, used[0] if used else "fp32", args.batch_size,
                  cores)
    result = {
        "posts": n,
        "spark_seconds": round(spark_s, 2),
        "spark_pipeline_seconds": round(pipeline_s, 2),
        "baseline_seconds": round(base_s, 2),
        "spark_posts_per_second": round(n / spark_s, 1),
        "baseline_posts_per_second": round(n / base_s, 1),
        "ratio": round((n / spark_s) / (n / base_s), 2),
        "label_agreement": round(agree, 4),
        "model_ceiling_posts_per_second": round(top, 1),
        "ratio_ceiling": round(top / (n / base_s), 2),
        "model": cfg.social.model,
        "model_hash": out["model_hash"][:12],
        "precision": "/".join(used),
        "cpu_native_bf16": models.native_bf16(),
        "batch_size": args.batch_size,
        "cores": cores,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
