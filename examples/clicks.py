"""Page views in, clean enriched clicks out, keyed by user.

    streamcore run examples/clicks.py:job --bootstrap 127.0.0.1:9092

Topics come from PAGEVIEWS_TOPIC / CLICKS_TOPIC (default: pageviews, clicks).
"""

import os
from urllib.parse import urlsplit

from streamcore import JSON, STR, Job, KafkaSink, KafkaSource

job = Job(os.environ.get("DEMO_JOB", "click-enricher"))


def enrich(view: dict) -> dict:  # type: ignore[type-arg]
    url = urlsplit(view["url"])
    return {**view, "host": url.netloc, "section": url.path.split("/")[1] or "home"}


(job.stream(KafkaSource(os.environ.get("PAGEVIEWS_TOPIC", "pageviews"), value=JSON,
                        timestamp=lambda v: v["ts"]))
    .filter(lambda v: not v["user"].startswith("bot-"))
    .map(enrich)
    .key_by(lambda v: v["user"])
    .to(KafkaSink(os.environ.get("CLICKS_TOPIC", "clicks"), key=STR, value=JSON)))
