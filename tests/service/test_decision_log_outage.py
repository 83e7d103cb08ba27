"""An outage of a shared PostgreSQL decision log: routing goes on, decisions wait in the
buffer, `POST /feedback` answers 503 (nothing stored, retry later), and once the database is
back the buffered decisions are written and verdicts accepted; nothing acknowledged is lost."""

import asyncio
from pathlib import Path

from tests.logs import rows
from tests.postgres import PostgresServer
from tests.service.conftest import categories_of, post
from tests.service.test_batching import sample

TOKEN = {"Authorization": "Bearer s3cret"}


async def test_a_database_outage_delays_the_log_and_refuses_verdicts_but_loses_nothing(
    running, tiny_store: Path, postgres_server: PostgresServer, postgres_url: str
) -> None:
    first = categories_of(tiny_store)[0]
    verdict = {"verdicts": [{"post_id": "o0", "category": first, "violating": True}]}
    async with running(admin_token="s3cret", decision_log_url=postgres_url) as (client, state):
        log = state.running.decision_log
        assert log is not None
        postgres_server.cut_off(postgres_url)
        try:
            routed = await client.post("/route", json=post("o0", "during the outage"))
            refused = await client.post("/feedback", json=verdict, headers=TOKEN)
            await asyncio.sleep(3 * log.flush_interval_s)  # the writer tries and fails
            text = (await client.get("/metrics")).text
        finally:
            postgres_server.cut_off(postgres_url, cut=False)
        assert routed.status_code == 200  # routing never waits for the log
        assert refused.status_code == 503
        assert refused.json()["error"] == "decision_log_unavailable"
        assert refused.headers["Retry-After"] == "1"
        assert sample(text, "radar_decision_log_write_failures_total") >= 1
        # Back: the caller's retry is accepted and joins the decision buffered meanwhile.
        for _ in range(50):
            retried = await client.post("/feedback", json=verdict, headers=TOKEN)
            if retried.status_code == 200:
                break
            await asyncio.sleep(0.1)
        assert retried.json() == {"accepted": 1, "joined": 1}
    assert sample(text, "radar_decision_log_dropped_total") == 0
    assert len(rows(postgres_url, "SELECT * FROM decisions WHERE post_id = 'o0'")) == len(
        categories_of(tiny_store)
    )
    assert rows(postgres_url, "SELECT post_id, violating FROM feedback") == [("o0", 1)]
