"""The pipeline on real LocalStack through the harness's latency proxy: a network round trip as in AWS."""

from __future__ import annotations

from pipeline.harness.proxy import latency_proxy
from pipeline.runner import Runtime, run
from pipeline.sample import sample_bodies
from stages.masking import generate_key
from tests.helpers import fetch, make_settings, queue_counts, send_bodies

KEY = generate_key("rtt").encode()


async def test_pipeline_drains_through_a_20ms_round_trip_with_adaptive_concurrency(queues, pg_dsn: str) -> None:  # type: ignore[no-untyped-def]
    # CASE: every SQS call pays +20 ms: all rows stored once, queue empty, RTTs and the adaptive limits observed
    send_bodies(queues.client, queues.queue_url, sample_bodies(400, 7))
    settings = make_settings(queues, pg_dsn, KEY)
    async with latency_proxy(queues.endpoint, 20) as via:
        settings = settings.model_copy(update={"sqs": settings.sqs.model_copy(update={"endpoint_url": via})})
        rt = Runtime(settings)
        summary = await run(settings, until_empty=True, runtime=rt)
    assert summary["inserted"] + summary["rejected"] == summary["acked"] >= 400
    assert fetch(pg_dsn, "SELECT count(*) = count(DISTINCT message_id) AS ok FROM user_logins")[0]["ok"]
    assert queue_counts(queues.client, queues.queue_url) == (0, 0)
    for op in ("ReceiveMessage", "DeleteMessageBatch"):
        rtt = rt.stats.rtt[op]
        assert rtt.count > 0 and rtt.sum / rtt.count >= 0.02, op  # the proxy's round trip is in every call
    s = settings.sqs
    assert s.min_receivers <= rt.stats.concurrency["receive"] <= s.max_receivers
    assert s.min_ackers <= rt.stats.concurrency["delete"] <= s.max_ackers
