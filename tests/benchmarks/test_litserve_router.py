"""The LitServe baseline of the serving benchmark (`benchmarks/litserve_router.py`): it serves
the same scores as our engine in-process, batches, and leaves no process behind on SIGTERM."""

import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.model.post import Post
from app.model.store import load_router
from app.service.engine import RouterEngine
from app.service.images import ImageLoader
from app.service.settings import Settings
from app.thresholds import load_thresholds
from benchmarks.loadgen import free_port
from tests.service.live import wait_ready

pytest.importorskip("litserve")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "litserve_router.py"
THRESHOLDS = ROOT / "thresholds" / "tiny.yaml"


def _loadgen_payloads(count: int) -> list[bytes]:
    spec = importlib.util.spec_from_file_location("loadgen", ROOT / "benchmarks" / "loadgen.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.payloads(count)[1]


def _children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


async def _post_all(url: str, bodies: list[bytes]) -> list[httpx.Response]:
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        posts = (client.post("/predict", content=body, headers=headers) for body in bodies)
        return await asyncio.gather(*posts)


def _reference_scores(store: Path, bodies: list[bytes]) -> dict[str, dict[str, float]]:
    """The same posts through `RouterEngine` in this process, one at a time."""
    router = load_router(store)
    thresholds = load_thresholds(THRESHOLDS, router.categories, router.config.model_version)
    engine, loader = RouterEngine(router), ImageLoader(Settings())
    scores = {}
    for body in bodies:
        post = json.loads(body)
        images = tuple(
            loader.decode_base64(post["post_id"], "images", image["data"])
            for image in post["images"]
        )
        model_post = Post(post["title"], post["ocr_text"], images)
        scores[post["post_id"]] = engine.route([model_post], thresholds)[0].scores
    return scores


def test_litserve_router_serves_our_scores_and_stops_on_sigterm(
    tiny_store: Path, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["--model-dir", str(tiny_store), "--thresholds", str(THRESHOLDS), "--port", str(port)]
    args += ["--max-batch-size", "8", "--max-wait-ms", "50", "--torch-threads", "1"]
    log = tmp_path / "litserve.log"
    with log.open("wb") as out:
        # cwd tmp_path: nothing may be written into the checkout; its own session, so that a
        # failed test can kill the whole process group.
        process = subprocess.Popen(
            [sys.executable, str(SCRIPT), *args],
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_ready(url, timeout_s=90, alive=process, path="/health")
        bodies = _loadgen_payloads(8)
        responses = asyncio.run(_post_all(url, bodies))
        assert [r.status_code for r in responses] == [200] * 8, log.read_text()[-3000:]

        expected = _reference_scores(tiny_store, bodies)
        for response in responses:
            answer = response.json()
            want = expected[answer["post_id"]]
            assert list(answer["scores"]) == ["lqc", "rcs", "fe"]
            assert answer["scores"] == pytest.approx(want, abs=1e-5)
            assert answer["thresholds_version"] == "tiny-1" and not answer["flags"]

        children = _children(process.pid)
        assert len(children) >= 3  # the manager, the inference worker, the HTTP server
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()[-3000:]
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in children if _alive(pid)], "LitServe processes left behind"
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
        assert not (tmp_path / "client.py").exists()
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever is left of its process group
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
