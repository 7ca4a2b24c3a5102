"""Synthetic social-media posts with a planted sentiment shift (seeded, deterministic).

Posts in the X/Twitter API v2 shape (JSON Lines) in eight languages, on and off
the migration topic, by authors living in the demo country's regions (the CDR
demo's admin polygons); with retweets, exact duplicates, API response pages with
``includes.places``, posts without a place, and one line of every quarantine
reason. After the event date the posts about migration from one region turn
negative (the planted shift). Each post's planted label and the counts are
written beside the data in ``truth.json`` / ``truth_posts.csv`` (the pipeline
never reads them).
"""

from __future__ import annotations

import csv
import json
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np

from jobs.demo import cdr_synth

SHIFT_REGION = "R1"
BEFORE = {"negative": 0.2, "neutral": 0.35, "positive": 0.45}
AFTER = {"negative": 0.75, "neutral": 0.15, "positive": 0.10}  # the shift region, after the event
LANGUAGES = {"en": 0.5, "es": 0.1, "fr": 0.1, "de": 0.06, "it": 0.06, "pt": 0.06, "ar": 0.06, "hi": 0.06}
ON_TOPIC = 0.6

TEMPLATES: dict[str, dict[str, list[str]]] = {
    "en": {
        "positive": ["So proud of our town for welcoming the refugees, what a wonderful community! {t}",
                     "Great to see migrants finding jobs and friends here. Love this place {t}",
                     "Amazing volunteers helping every migrant family today, thank you all! {t}"],
        "negative": ["This is terrible. Refugees left without food or shelter, a disgrace and a shame {t}",
                     "Awful scenes at the border, migrants treated horribly. I am so angry {t}",
                     "Sad and disgusting how the asylum seekers are abandoned, worst week ever {t}"],
        "neutral": ["Official figures on migration for the region were published today {t}",
                    "The ministry will discuss asylum procedures at a meeting on Tuesday {t}",
                    "Report: number of refugees registered this month {t}"],
        "off": ["Football tonight at the stadium, kick-off at eight {t}", "Traffic on the main road this morning {t}",
                "New bakery opened near the market {t}", "Rain expected for the whole weekend {t}"],
    },
    "es": {
        "positive": ["¡Qué orgullo! Nuestra ciudad da la bienvenida a los refugiados {t}",
                     "Maravilloso ver a los migrantes felices con su nuevo trabajo {t}"],
        "negative": ["Terrible, los refugiados están sin comida ni refugio, una vergüenza {t}",
                     "Horrible trato a los migrantes en la frontera, qué asco {t}"],
        "neutral": ["Se publicaron hoy las cifras de migración de la región {t}"],
        "off": ["Partido de fútbol esta noche {t}", "Mucho tráfico en la carretera {t}"],
    },
    "fr": {
        "positive": ["Tellement fier de notre ville qui accueille les réfugiés, merci ! {t}",
                     "Formidable de voir les migrants trouver du travail ici {t}"],
        "negative": ["Honteux, les réfugiés sont abandonnés sans nourriture, c'est horrible {t}",
                     "Scènes terribles à la frontière, les migrants sont maltraités {t}"],
        "neutral": ["Les chiffres de la migration ont été publiés aujourd'hui {t}"],
        "off": ["Match de football ce soir au stade {t}", "Il pleuvra tout le week-end {t}"],
    },
    "de": {
        "positive": ["Wunderbar, wie unsere Stadt die Flüchtlinge willkommen heißt! {t}"],
        "negative": ["Schrecklich, die Flüchtlinge haben kein Essen, eine Schande {t}"],
        "neutral": ["Die Zahlen zur Migration wurden heute veröffentlicht {t}"],
        "off": ["Heute Abend Fußball im Stadion {t}"],
    },
    "it": {
        "positive": ["Bellissimo vedere la città accogliere i rifugiati, grazie! {t}"],
        "negative": ["Terribile, i migranti abbandonati senza cibo, che vergogna {t}"],
        "neutral": ["Pubblicati oggi i dati sulla migrazione {t}"],
        "off": ["Partita di calcio stasera {t}"],
    },
    "pt": {
        "positive": ["Que orgulho da nossa cidade acolhendo os refugiados! {t}"],
        "negative": ["Terrível, os migrantes estão abandonados sem comida, uma vergonha {t}"],
        "neutral": ["Os números da migração foram publicados hoje {t}"],
        "off": ["Jogo de futebol hoje à noite {t}"],
    },
    "ar": {
        "positive": ["رائع أن نرى مدينتنا ترحب باللاجئين، شكرا للجميع {t}"],
        "negative": ["أمر فظيع، اللاجئين بلا طعام ولا مأوى، عار {t}"],
        "neutral": ["نشرت اليوم أرقام الهجرة في المنطقة {t}"],
        "off": ["مباراة كرة القدم الليلة {t}"],
    },
    "hi": {
        "positive": ["बहुत अच्छा लगा कि हमारा शहर शरणार्थी परिवारों का स्वागत कर रहा है {t}"],
        "negative": ["भयानक, शरणार्थी बिना खाने के छोड़ दिए गए, शर्म की बात {t}"],
        "neutral": ["आज क्षेत्र में प्रवासी संख्या के आंकड़े जारी हुए {t}"],
        "off": ["आज रात क्रिकेट मैच है {t}"],
    },
}
BAD_LINES = {  # one raw line per quarantine reason (bytes)
    "bad_json": b'{"id": "1", "text": "unterminated',
    "invalid_utf8": b'{"id": "2", "text": "caf\xe9 migrants", "author_id": "9", "created_at": "2024-03-05T10:00:00Z"}',
    "missing_text": b'{"id": "3", "author_id": "9", "created_at": "2024-03-05T10:00:00Z"}',
    "missing_time": b'{"id": "4", "text": "refugees", "author_id": "9"}',
    "unparseable_time": b'{"id": "5", "text": "refugees", "author_id": "9", "created_at": "yesterday noon"}',
    "missing_author": b'{"id": "6", "text": "refugees", "created_at": "2024-03-05T10:00:00Z"}',
    "missing_id": b'{"text": "refugees", "author_id": "9", "created_at": "2024-03-05T10:00:00Z"}',
    "not_a_post": b'["a", "json", "array"]',
    "empty_line": b"   ",
}


def _region_bounds() -> dict[str, tuple[float, float, float, float]]:
    out = {}
    for r in sorted({d.admin1 for d in cdr_synth.districts()}):
        ds = [d.bounds for d in cdr_synth.districts() if d.admin1 == r]
        out[r] = (min(b[0] for b in ds), min(b[1] for b in ds), max(b[2] for b in ds), max(b[3] for b in ds))
    return out


def generate(out_dir: Path, seed: int, n_authors: int, posts_per_author: float, start: date, n_days: int,
             event_day: int, files: int = 4, on_topic_share: float = ON_TOPIC) -> dict:
    """Write ``files`` JSON Lines files of posts under ``out_dir/posts`` and the truth beside them in
    ``out_dir``; return the truth summary."""
    rng = np.random.default_rng(seed)
    posts_dir = out_dir / "posts"
    posts_dir.mkdir(parents=True, exist_ok=True)
    for f in posts_dir.glob("posts-*.jsonl"):
        f.unlink()
    bounds = _region_bounds()
    regions = sorted(bounds)
    event = start + timedelta(days=event_day)
    author_ids = 10**12 + rng.choice(9 * 10**12, size=n_authors, replace=False)
    author_region = rng.choice(regions, size=n_authors)
    author_lang = rng.choice(list(LANGUAGES), size=n_authors, p=list(LANGUAGES.values()))
    n_posts = int(round(n_authors * posts_per_author))
    who = rng.integers(0, n_authors, size=n_posts)
    day = rng.integers(0, n_days, size=n_posts)
    second = rng.integers(0, 86400, size=n_posts)
    order = np.lexsort((second, day))
    who, day, second = who[order], day[order], second[order]
    lines: list[bytes] = []
    truth_rows = []
    counts = {"posts": 0, "retweets": 0, "duplicates": 0, "api_pages": 0}
    last_on_topic: dict | None = None
    next_id = 1_700_000_000_000_000_000
    for i in range(n_posts):
        a = int(who[i])
        lang = str(author_lang[a])
        region = str(author_region[a])
        when = datetime.combine(start + timedelta(days=int(day[i])), datetime.min.time()) + timedelta(
            seconds=int(second[i]))
        on_topic = rng.random() < on_topic_share
        if on_topic:
            dist = AFTER if (region == SHIFT_REGION and when.date() >= event) else BEFORE
            label = str(rng.choice(list(dist), p=list(dist.values())))
        else:
            label = "off"
        text = str(rng.choice(TEMPLATES[lang][label])).format(t=f"#{int(rng.integers(1, 10**6))}").strip()
        next_id += int(rng.integers(1, 1000))
        tweet: dict = {"id": str(next_id), "text": text, "author_id": str(author_ids[a]),
                       "created_at": when.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
                       "public_metrics": {"retweet_count": 0, "like_count": int(rng.integers(0, 50))}}
        if rng.random() < 0.8:
            tweet["lang"] = lang
        w, s, e, n = bounds[region]
        u = rng.random()
        place_kind = None
        page = False
        if u < 0.55:
            tweet["geo"] = {"coordinates": {"type": "Point", "coordinates": [round(w + (e - w) * rng.uniform(.05, .95), 6),
                                                                           round(s + (n - s) * rng.uniform(.05, .95), 6)]}}
            place_kind = "point"
        elif u < 0.75:
            cx, cy = w + (e - w) * rng.uniform(.3, .7), s + (n - s) * rng.uniform(.3, .7)
            place_id = f"p{region}{int(rng.integers(0, 50))}"
            tweet["geo"] = {"place_id": place_id}
            place = {"id": place_id, "full_name": f"Town in {region}",
                     "geo": {"type": "Feature", "bbox": [cx - .05, cy - .05, cx + .05, cy + .05]}}
            page = True
            place_kind = "bbox"
        if page:
            lines.append(json.dumps({"data": [tweet], "includes": {"places": [place]}}, ensure_ascii=False).encode())
            counts["api_pages"] += 1
        else:
            lines.append(json.dumps(tweet, ensure_ascii=False).encode())
        counts["posts"] += 1
        truth_rows.append((tweet["id"], region if place_kind else "", lang, label, when.date().isoformat(), 0, 0))
        if on_topic:
            last_on_topic = tweet
        r = rng.random()
        if r < 0.04 and last_on_topic is not None:  # a retweet by another author
            b = int(rng.integers(0, n_authors))
            next_id += 1
            rt = {"id": str(next_id), "text": f"RT @someone: {last_on_topic['text']}", "author_id": str(author_ids[b]),
                  "created_at": tweet["created_at"], "lang": str(author_lang[b]),
                  "referenced_tweets": [{"type": "retweeted", "id": last_on_topic["id"]}]}
            lines.append(json.dumps(rt, ensure_ascii=False).encode())
            counts["retweets"] += 1
            truth_rows.append((rt["id"], "", str(author_lang[b]), "retweet", when.date().isoformat(), 1, 0))
        elif r < 0.07:  # the same post delivered twice
            lines.append(lines[-1])
            counts["duplicates"] += 1
            counts["api_pages"] += int(page)
            truth_rows.append((tweet["id"], "", lang, "duplicate", when.date().isoformat(), 0, 1))
    # one line per quarantine reason, spread over the files
    positions = rng.choice(len(lines), size=len(BAD_LINES), replace=False)
    for pos, (_reason, raw) in sorted(zip(positions, BAD_LINES.items(), strict=True), reverse=True):
        lines.insert(int(pos), raw)
    per = -(-len(lines) // files)
    for k in range(files):
        with (posts_dir / f"posts-{k:02d}.jsonl").open("wb") as fh:
            for line in lines[k * per:(k + 1) * per]:
                fh.write(line + b"\n")
    with (out_dir / "truth_posts.csv").open("w", newline="", encoding="utf-8") as fh:
        w_ = csv.writer(fh)
        w_.writerow(["id", "region", "language", "planted", "date", "retweet", "duplicate"])
        w_.writerows(truth_rows)
    truth = {"seed": seed, "event_date": event.isoformat(), "shift_region": SHIFT_REGION, "before": BEFORE,
             "after_in_shift_region": AFTER, "on_topic_share": on_topic_share, "languages": LANGUAGES,
             "lines": len(lines), "bad_lines": {k: 1 for k in BAD_LINES}, **counts}
    (out_dir / "truth.json").write_text(json.dumps(truth, indent=2))
    return truth
