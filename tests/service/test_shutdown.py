"""The real process: `python -m app.cli serve` under SIGTERM, and with a broken model store.

Each test starts a subprocess (~10 s of imports and start-up on a busy CI machine).
"""

import asyncio
import inspect
import shutil
import signal
import time
from pathlib import Path

import httpx
import pytest

import app.cli
from benchmarks.loadgen import free_port
from tests.service.conftest import png_b64, write_thresholds
from tests.service.live import serve_subprocess, wait_ready

pytestmark = pytest.mark.slow

# `radar serve` exits 0 after a drain only when it runs through `run_server` (uvicorn
# re-raises SIGTERM to the default handler otherwise: exit status -15).
CLI_EXITS_0 = "run_server" in inspect.getsource(app.cli)


def _batch(prefix: str, posts: int) -> dict:
    image = [{"data": png_b64(64, 64)}]
    return {"posts": [{"post_id": f"{prefix}-{i}", "images": image} for i in range(posts)]}


async def test_sigterm_drains_in_flight_requests_then_exits(tiny_store, tmp_path) -> None:
    thresholds = tmp_path / "t.yaml"
    write_thresholds(thresholds, tiny_store, "v1", 0.5)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        "RADAR_MAX_BATCH_SIZE": "4",  # many small forwards: the work outlasts the signal
        "RADAR_QUEUE_SIZE": "4096",
        "RADAR_DEADLINE_MS": "60000",
        "RADAR_TORCH_THREADS": "1",
        "RADAR_SHUTDOWN_GRACE_S": "1.5",
    }
    args = ["--port", str(port), "--model-dir", str(tiny_store), "--thresholds", str(thresholds)]
    requests, posts = 24, 16
    with serve_subprocess(args, env, tmp_path / "serve.log") as process:
        wait_ready(url, timeout_s=90, alive=process)
        limits = httpx.Limits(max_connections=requests + 4)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
            sent = [
                asyncio.create_task(client.post("/route/batch", json=_batch(f"r{i}", posts)))
                for i in range(requests)
            ]
            await _until_all_accepted(client, requests * posts)
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            await asyncio.sleep(0.3)
            # The grace period: readiness fails at once, so load balancers stop sending,
            # while the server still accepts and answers what they sent meanwhile.
            async with httpx.AsyncClient(base_url=url, timeout=60) as during:
                ready = await during.get("/readyz")
                routed = await during.post("/route", json=_batch("grace", 1)["posts"][0])
            assert ready.status_code == 503 and ready.json()["reason"] == "shutting down"
            assert routed.status_code == 200, routed.text
            await asyncio.sleep(max(0.0, signalled + 1.5 + 0.5 - time.monotonic()))
            # After the grace: a new connection finds nobody listening, stopped accepting.
            async with httpx.AsyncClient(base_url=url, timeout=2) as late:
                with pytest.raises(httpx.ConnectError):
                    await late.get("/healthz")
            answers = await asyncio.gather(*sent, return_exceptions=True)
            drained = time.monotonic() - signalled
        code = await asyncio.to_thread(process.wait, 60)
    log = (tmp_path / "serve.log").read_text()
    assert [getattr(a, "status_code", a) for a in answers] == [200] * requests, log[-3000:]
    for i, answer in enumerate(answers):
        assert [r["post_id"] for r in answer.json()["results"]] == [
            f"r{i}-{j}" for j in range(posts)
        ]
    assert drained > 0.5, "the work should have outlasted the signal"
    assert "Shutting down" in log and "Application shutdown complete" in log
    if not CLI_EXITS_0:
        pytest.xfail(f"exit status {code}: app/cli.py must serve through run_server")
    assert code == 0, log[-3000:]


async def _until_all_accepted(client: httpx.AsyncClient, total: int) -> None:
    """Until every post is inside the service: forwarded (batch-size sum) or queued."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = (await client.get("/metrics")).text
        values = {
            line.split(" ")[0]: float(line.split(" ")[1])
            for line in text.splitlines()
            if line.startswith(("radar_batch_size_sum", "radar_queue_depth"))
        }
        if values.get("radar_batch_size_sum", 0) + values.get("radar_queue_depth", 0) >= total:
            return
        await asyncio.sleep(0.02)
    raise TimeoutError("the requests never all arrived")


def test_a_corrupt_model_store_exits_non_zero_with_a_clear_message(tiny_store, tmp_path) -> None:
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    (store / "head.safetensors").write_bytes(b"\0" * 10)  # half-written / corrupt weights
    log = tmp_path / "serve.log"
    args = ["--port", str(free_port()), "--model-dir", str(store)]
    with serve_subprocess(args, {}, log) as process:
        code = process.wait(timeout=120)
    text = log.read_text()
    assert code != 0
    assert f"cannot load the router from {store}" in text
    assert f"{Path(store) / 'head.safetensors'}: not a readable safetensors file" in text
