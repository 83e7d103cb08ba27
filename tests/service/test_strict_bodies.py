"""Bodies that could mean two things, or cost much to refuse (issue 13, items 2, 5 and 9).

- A JSON object with a repeated key is a 422 on every endpoint that takes a body: with the
  last key winning, a trailing `"title": ""` silently dropped a spam post's text.
- Every list of a body is bounded by length before its items are validated, and a 422 lists
  the first few errors and counts the rest: 200,000 invalid items cost one check.
- Control characters (NUL first) in a post id or a verdict's category are a 422: PostgreSQL
  refuses a NUL in text, and one such row failed every flush of the decision log.
"""

import json
import time

from tests.service.conftest import post

JSON = {"content-type": "application/json"}
SPAM = "Congratulations! You won a free cruise, call now to claim"


async def test_a_repeated_key_is_refused_at_every_level_and_endpoint(running) -> None:
    cases = [
        ("/route", f'{{"post_id": "p", "title": "{SPAM}", "title": ""}}'),
        ("/route", '{"post_id": "p", "post_id": "q"}'),
        ("/route", '{"post_id": "p", "images": [{"url": "https://a.example/x", "url": "y"}]}'),
        ("/route/batch", '{"posts": [{"post_id": "a"}], "posts": [{"post_id": "b"}]}'),
        ("/route/batch", '{"posts": [{"post_id": "a", "title": "x", "title": "y"}]}'),
        ("/feedback", '{"verdicts": [{"post_id": "a", "category": "spam", "category": "rcs"}]}'),
    ]
    async with running(admin_token="s3cret") as (client, _):
        plain = await client.post("/route", json=post("p", title=SPAM))
        for path, raw in cases:
            response = await client.post(
                path, content=raw, headers={**JSON, "authorization": "Bearer s3cret"}
            )
            assert response.status_code == 422, (raw, response.text)
            body = response.json()
            assert body["error"] == "invalid_request", raw
            assert body["detail"][0]["loc"] == ["body"]
            assert "repeated in one JSON object" in body["detail"][0]["msg"], body
    # The same keys once each are fine: only the repetition is refused.
    assert plain.status_code == 200


async def test_many_invalid_items_cost_one_check_and_a_short_answer(running) -> None:
    many = json.dumps({"posts": [{"post_id": 5}] * 200_000})  # ~2.6 MB, every item invalid
    images = json.dumps({"post_id": "p", "images": [{"data": 5}] * 200_000})
    verdicts = json.dumps({"verdicts": [{"post_id": 1}] * 200_000})
    async with running(admin_token="s3cret") as (client, _):
        answers = []
        for path, raw in (("/route/batch", many), ("/route", images), ("/feedback", verdicts)):
            started = time.perf_counter()
            response = await client.post(
                path, content=raw, headers={**JSON, "authorization": "Bearer s3cret"}
            )
            answers.append((path, response, time.perf_counter() - started))
        # Under the ceiling, many invalid items: each error counted, the first 20 listed.
        some = await client.post("/route/batch", json={"posts": [{"post_id": 5}] * 300})
    for path, response, seconds in answers:
        assert response.status_code == 422, (path, response.text[:200])
        body = response.json()
        assert body["errors_total"] == 1 and "at most" in body["detail"][0]["msg"], body
        assert len(response.content) < 1000, path
        # Generous for a noisy machine; item-by-item validation took ~15 s.
        assert seconds < 5, (path, seconds)
    assert some.status_code == 422
    assert some.json()["errors_total"] == 300 and len(some.json()["detail"]) == 20


async def test_control_characters_in_ids_are_refused(running) -> None:
    bad_ids = ["a\x00b", "line\nbreak", "tab\there", "\x1b[31mred", "del\x7f"]
    async with running(admin_token="s3cret") as (client, _):
        routed = [await client.post("/route", json=post(bad)) for bad in bad_ids]
        verdicts = await client.post(
            "/feedback",
            json={"verdicts": [{"post_id": "a\x00", "category": "spam", "violating": True}]},
            headers={"authorization": "Bearer s3cret"},
        )
        category = await client.post(
            "/feedback",
            json={"verdicts": [{"post_id": "a", "category": "sp\x00am", "violating": True}]},
            headers={"authorization": "Bearer s3cret"},
        )
        # Letters of any script, spaces and symbols stay valid ids.
        fine = await client.post("/route", json=post("пост 42 · 🙂"))
    for bad, response in zip(bad_ids, routed, strict=True):
        assert response.status_code == 422, (bad, response.text)
        assert response.json()["detail"][0]["loc"] == ["body", "post_id"], response.text
        assert "control character" in response.json()["detail"][0]["msg"]
    assert verdicts.status_code == 422
    assert verdicts.json()["detail"][0]["loc"] == ["body", "verdicts", 0, "post_id"]
    assert category.status_code == 422
    assert category.json()["detail"][0]["loc"] == ["body", "verdicts", 0, "category"]
    assert fine.status_code == 200, fine.text
