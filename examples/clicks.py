"""Page views in; clean enriched clicks out, keyed by user; a running count per section.

    streamcore run examples/clicks.py:job --bootstrap 127.0.0.1:9092 --state-dir ./state

Topics come from PAGEVIEWS_TOPIC / CLICKS_TOPIC / SECTIONS_TOPIC (default: pageviews, clicks,
section-views). The count is a stateful step: its store lives under the state directory and
its changelog topic is {job}-views-per-section-changelog.
"""

import os
from urllib.parse import urlsplit

from streamcore import JSON, STR, Job, KafkaSink, KafkaSource

job = Job(os.environ.get("DEMO_JOB", "click-enricher"))


def enrich(view: dict) -> dict:  # type: ignore[type-arg]
    url = urlsplit(view["url"])
    return {**view, "host": url.netloc, "section": url.path.split("/")[1] or "home"}


views = (job.stream(KafkaSource(os.environ.get("PAGEVIEWS_TOPIC", "pageviews"), value=JSON,
                                timestamp=lambda v: v["ts"]))
         .filter(lambda v: not v["user"].startswith("bot-"))
         .map(enrich))
(views
    .key_by(lambda v: v["user"])
    .to(KafkaSink(os.environ.get("CLICKS_TOPIC", "clicks"), key=STR, value=JSON)))
(views
    .key_by(lambda v: v["section"])
    .count(name="views-per-section")
    .to(KafkaSink(os.environ.get("SECTIONS_TOPIC", "section-views"), key=STR, value=JSON)))
