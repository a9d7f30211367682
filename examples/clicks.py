"""Page views in; clean enriched clicks out, keyed by user; a running count per section.

    streamcore run examples/clicks.py:job --bootstrap 127.0.0.1:9092 --state-dir ./state

Topics come from PAGEVIEWS_TOPIC / CLICKS_TOPIC / SECTIONS_TOPIC / WINDOWS_TOPIC (default:
pageviews, clicks, section-views, section-windows). The counts are stateful steps: their
stores live under the state directory and their changelog topics are
{job}-views-per-section-changelog and {job}-section-windows-changelog. The windowed count
is on event time (the view's ``ts``): each 5-second window per section is written once,
when the watermark (2 s behind the latest view) passes its end.
"""

import os
from urllib.parse import urlsplit

from streamcore import JSON, STR, Job, KafkaSink, KafkaSource, Tumbling

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
(views
    .with_watermark("2s")
    .key_by(lambda v: v["section"])
    .window(Tumbling("5s"))
    .count(name="section-windows")
    .to(KafkaSink(os.environ.get("WINDOWS_TOPIC", "section-windows"), key=JSON, value=JSON),
        output_mode="append"))
