"""The plan between the API and the runtime: Job.build() freezes the job, the planner lays it
out for an application id in sub-topologies split at repartition topics."""

from __future__ import annotations

import dataclasses

import pytest

from streamcore import JSON, STR, Job, JobDefinitionError, KafkaSink, KafkaSource
from streamcore.plan.physical import plan


def _keyed_job() -> Job:
    job = Job("per-user")
    s = job.stream(KafkaSource("in", value=JSON))
    (s.key_by(lambda v: v["user"])
        .aggregate(lambda: 0, lambda a, v: a + v["amount"], name="totals")
        .to_stream()
        .to(KafkaSink("out", key=STR, value=JSON)))
    s.filter(lambda v: v["amount"] > 100, name="big").to(KafkaSink("big", value=JSON))
    return job


def test_sub_topologies_split_at_the_repartition_topic() -> None:
    p = plan(_keyed_job().build(), "group-a")
    first, second = p.subtopologies
    assert first.inputs == ("in",)
    assert first.outputs == ("group-a-totals-repartition", "big")
    assert first.stores == ()
    assert second.inputs == ("group-a-totals-repartition",)
    assert second.outputs == ("out",)
    assert second.stores == (("totals", "group-a-totals-changelog"),)
    assert p.subscription() == ["in", "group-a-totals-repartition"]
    assert p.source_for_topic("group-a-totals-repartition") is second.roots[0]
    text = p.explain()
    assert "application id 'group-a'" in text and "Sub-topology 1" in text
    assert "changelog group-a-totals-changelog" in text


def test_a_union_of_two_sources_is_one_sub_topology() -> None:
    job = Job("u")
    a = job.stream(KafkaSource("a", value=JSON))
    b = job.stream(KafkaSource("b", value=JSON))
    a.union(b).map(lambda v: v).to(KafkaSink("out", value=JSON))
    (sub,) = plan(job.build()).subtopologies
    assert sub.inputs == ("a", "b") and len(sub.roots) == 2


def test_the_plan_is_frozen_when_built() -> None:
    job = _keyed_job()
    logical = job.build()
    job.stream(KafkaSource("later", value=JSON)).to(KafkaSink("later-out", value=JSON))
    assert "later" not in plan(logical).subscription()
    with pytest.raises(dataclasses.FrozenInstanceError):
        logical.name = "other"  # type: ignore[misc]


def test_build_refuses_a_graph_that_cannot_run() -> None:
    with pytest.raises(JobDefinitionError, match="no source"):
        Job("empty").build()
    job = Job("no-output")
    job.stream(KafkaSource("in")).map(lambda v: v)
    with pytest.raises(JobDefinitionError, match="no output"):
        job.build()
