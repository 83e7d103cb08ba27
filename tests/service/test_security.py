"""Security: nothing internal leaks through errors or logs; the admin token check is sound.

(401/403/404 of the admin endpoint: `test_thresholds_reload.py`; SSRF: `test_image_urls.py`.)
"""

import asyncio
import logging

import pytest
from pydantic import SecretStr

from app.service import admin
from app.service.app import create_app
from tests.service.conftest import post, serve, write_thresholds

LEAKS = ("Traceback", 'File "', ".py", "/tmp", "/work", "/home", "site-packages")  # noqa: S108
JSON = {"content-type": "application/json"}


def assert_no_leak(response, *private: str) -> None:
    for marker in (*LEAKS, *private):
        assert marker not in response.text, (marker, response.status_code, response.text)


async def test_no_stack_trace_or_path_in_any_error(make_settings, tmp_path, thresholds_path):
    root = str(tmp_path)
    app = create_app(make_settings(admin_token="s3cret", max_body_bytes=4096))
    state = app.state.radar
    async with serve(app, raise_app_exceptions=False) as client:
        auth = {"Authorization": "Bearer s3cret"}
        responses = [
            await client.post("/route", content=b"{bad", headers=JSON),
            await client.post("/route", json={"post_id": "x", "images": [{"data": "aGVsbG8="}]}),
            await client.post("/route", json=post("big", "x" * 5000)),
            await client.get("/nowhere"),
            await client.delete("/route"),
            await client.post("/admin/thresholds/reload"),
        ]
        # A thresholds file refused: the admin answer and /readyz say why, not where.
        thresholds_path.write_text("version: [unclosed")
        responses.append(await client.post("/admin/thresholds/reload", headers=auth))
        thresholds_path.unlink()
        responses.append(await client.post("/admin/thresholds/reload", headers=auth))

        def explode(*_args: object) -> None:
            raise RuntimeError(f"internal detail at {root}/secret.py line 3")

        state.running.batcher.submit = explode  # an unexpected bug on the request path: a 500
        responses.append(await client.post("/route", json=post("boom")))
    assert [r.status_code for r in responses] == [422, 422, 413, 404, 405, 401, 422, 422, 500]
    for response in responses:
        assert_no_leak(response, root)
        assert set(response.json()) in (
            {"error", "detail"},
            {"error", "detail", "errors_total"},  # a 422 invalid_request counts its errors
            set(admin.ReloadOutcome.model_fields),
        )
    assert responses[-1].json() == {"error": "internal", "detail": "internal error"}


async def test_readiness_reason_names_no_path(running, tmp_path, thresholds_path) -> None:
    thresholds_path.write_text("not: [valid")
    async with running() as (client, _):
        ready = await client.get("/readyz")
    assert ready.status_code == 503 and "not valid YAML" in ready.json()["reason"]
    assert_no_leak(ready, str(tmp_path))


async def test_request_bodies_are_not_logged(running, caplog, tiny_store, thresholds_path) -> None:
    marker = "BODY-MARKER-7f3a"
    caplog.set_level(logging.INFO)  # the service's default level
    async with running(url_allowlist=["127.0.0.1"]) as (client, state):
        await client.post("/route", json=post("ok", title=marker, ocr=marker))
        await client.post("/route", json={"post_id": marker, "images": [{"data": marker}]})
        await client.post(
            "/route", json={"post_id": "u", "images": [{"url": f"http://127.0.0.1/{marker}"}]}
        )
        await client.post("/route", json={"post_id": "x", marker: marker})

        def failing(_inputs: object) -> None:
            raise RuntimeError("injected")

        state.running.router.forward = failing  # the model-failure path logs too
        await client.post("/route", json=post("f", title=marker))
        write_thresholds(thresholds_path, tiny_store, "v2", 0.4)
    assert "injected" in caplog.text  # the log works; it just never holds a body
    assert marker not in caplog.text


@pytest.mark.parametrize("given", ["a", "s3cre", "s3cret-and-more", "S3CRET", "x" * 4096])
def test_token_comparison_is_constant_time_over_fixed_length_digests(
    monkeypatch, given: str
) -> None:
    seen: list[tuple[int, int]] = []
    real = admin.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(admin.hmac, "compare_digest", spy)
    state = _FakeState("s3cret")
    with pytest.raises(admin.ForbiddenError):
        asyncio.run(admin.require_admin(state, f"Bearer {given}"))
    asyncio.run(admin.require_admin(state, "Bearer s3cret"))
    # Every comparison sees two SHA-256 digests: the length of a guess changes nothing.
    assert seen == [(32, 32), (32, 32)]


class _FakeState:
    """Just enough of the service state for `require_admin`."""

    def __init__(self, token: str) -> None:
        self.settings = type("S", (), {"admin_token": SecretStr(token)})()
