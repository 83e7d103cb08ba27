"""Traffic, measurement and the server process for `load_test.py` (loopback only).

Open-loop traffic (a fixed arrival rate, whatever the answers) is what an upload pipeline
sends, and the only way to overload a server on purpose; closed-loop traffic (N callers,
each sending again on an answer) finds the saturation throughput.
"""

import asyncio
import base64
import contextlib
import io
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
JSON_HEADERS = {"content-type": "application/json"}


@dataclass
class Outcome:
    """One request as the client saw it."""

    sent: float  # time.monotonic()
    latency: float  # seconds until the answer or the error
    status: int | None  # None: no HTTP answer (timeout, connection error)
    retry_after: str | None = None
    body: dict[str, Any] | None = None
    error: str | None = None


class ShardedClient:
    """Many small httpx clients used in turn. One client with a pool of hundreds of
    connections spends its CPU scanning the pool (httpcore is O(connections) per request);
    the load generator must not be what saturates."""

    def __init__(self, url: str, shards: int = 64, connections: int = 16, **kw: Any) -> None:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self.clients = [httpx.AsyncClient(base_url=url, limits=limits, **kw) for _ in range(shards)]
        self._next = itertools.cycle(self.clients)

    def pick(self) -> httpx.AsyncClient:
        return next(self._next)

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()


def payloads(count: int = 16, posts_per_request: int = 1) -> tuple[str, list[bytes]]:
    """Posts like an upload pipeline's, serialised once: 1-4 images, a title, OCR text;
    `/route` bodies, or `/route/batch` bodies of `posts_per_request` posts.

    Batches make the server's work per request large next to the client's (one JSON body),
    so that one client process can offer several times what the server can take.
    """
    titles = ["Earn $500/day from home", "my cat again", "new recipe!!", "DM for prices"]
    bodies = []
    for i in range(count):
        images = []
        for j in range(i % 4 + 1):
            buffer = io.BytesIO()
            size = (32 + 16 * ((i + j) % 5), 48 + 8 * j)
            Image.new("RGB", size, (i * 13 % 256, 40 * j, 160)).save(buffer, format="PNG")
            images.append({"data": base64.b64encode(buffer.getvalue()).decode()})
        post = {
            "post_id": f"load-{i}",
            "title": titles[i % len(titles)],
            "ocr_text": "follow the link in bio for cheap likes and free followers " * (i % 4 + 1),
            "images": images,
        }
        bodies.append(post)
    if posts_per_request == 1:
        return "/route", [json.dumps(p).encode() for p in bodies]
    batches = [
        {
            "posts": [
                {**bodies[(i + j) % count], "post_id": f"p{j}"} for j in range(posts_per_request)
            ]
        }
        for i in range(count)
    ]
    return "/route/batch", [json.dumps(b).encode() for b in batches]


async def send(
    client: ShardedClient | httpx.AsyncClient, path: str, body: bytes, keep_body: bool = False
) -> Outcome:
    started = time.monotonic()
    http = client.pick() if isinstance(client, ShardedClient) else client
    try:
        response = await http.post(path, content=body, headers=JSON_HEADERS)
    except httpx.HTTPError as exc:
        return Outcome(started, time.monotonic() - started, None, error=type(exc).__name__)
    latency = time.monotonic() - started
    kept = response.json() if keep_body and response.status_code == 200 else None
    return Outcome(
        started, latency, response.status_code, response.headers.get("retry-after"), kept
    )


@dataclass
class Window:
    """When a closed loop's measured window opens and closes (set by `closed_loop`)."""

    opened: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)


async def closed_loop(
    client: ShardedClient,
    path: str,
    bodies: list[bytes],
    callers: int,
    duration_s: float,
    warmup_s: float = 0.0,
    window: Window | None = None,
) -> list[Outcome]:
    """`callers` concurrent callers, each sending again as soon as it has its answer; returns
    the requests *answered* within a window of `duration_s`.

    The window opens once every caller has had an answer and `warmup_s` has passed: the
    steady state, whatever the latency (with 128 callers of image posts, one round takes
    ~6 s, longer than any fixed warm-up here). Counted by answer time, len(result) /
    duration_s is the rate: counted by send time, the up to `callers` requests in flight at
    the end (answered after it) fell in the window and overstated the rate by up to
    callers / duration_s, 16 posts/s at 128 callers over 8 s.
    """
    started = time.monotonic()
    bounds: list[float] = []  # [opens, closes], once every caller has had an answer
    answered: set[int] = set()
    window = window or Window()
    outcomes: list[Outcome] = []

    def open_window(now: float) -> None:
        opens = max(now, started + warmup_s)
        bounds.extend([opens, opens + duration_s])
        loop = asyncio.get_running_loop()
        loop.call_later(opens - now, window.opened.set)
        loop.call_later(opens + duration_s - now, window.closed.set)

    async def caller(index: int) -> None:
        i = index
        while not bounds or time.monotonic() < bounds[1]:
            outcomes.append(await send(client, path, bodies[i % len(bodies)]))
            i += callers
            if index not in answered:
                answered.add(index)
                if len(answered) == callers:
                    open_window(time.monotonic())

    await asyncio.gather(*(caller(i) for i in range(callers)))
    window.opened.set()
    window.closed.set()
    opens, closes = bounds
    return [o for o in outcomes if opens <= o.sent + o.latency <= closes]


async def open_loop(
    client: ShardedClient,
    path: str,
    bodies: list[bytes],
    rate: float,
    duration_s: float,
    keep_body: bool = False,
    max_in_flight: int = 4000,
) -> tuple[list[Outcome], float]:
    """Requests at `rate`/s for `duration_s`, answered or not; returns them and the rate the
    client actually achieved (a busy client falls behind: report it, do not hide it)."""
    tasks: list[asyncio.Task[Outcome]] = []
    interval = 1.0 / rate
    started = time.monotonic()
    next_at = started
    i = 0
    while next_at < started + duration_s:
        now = time.monotonic()
        if next_at > now:
            await asyncio.sleep(next_at - now)
        if sum(not t.done() for t in tasks[-max_in_flight:]) < max_in_flight:
            body = bodies[i % len(bodies)]
            tasks.append(asyncio.create_task(send(client, path, body, keep_body)))
        i += 1
        next_at += interval
    achieved = len(tasks) / max(time.monotonic() - started, 1e-9)
    return list(await asyncio.gather(*tasks)), achieved


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(outcomes: list[Outcome], duration_s: float, deadline_s: float) -> dict[str, Any]:
    """Counts by status, goodput (200 within the deadline per second) and latencies in ms."""
    ok = [o for o in outcomes if o.status == 200]
    shed = [o for o in outcomes if o.status == 503]
    statuses: dict[str, int] = {}
    for o in outcomes:
        key = str(o.status) if o.status is not None else (o.error or "error")
        statuses[key] = statuses.get(key, 0) + 1
    return {
        "requests": len(outcomes),
        "statuses": statuses,
        "errors": len(outcomes) - len(ok),
        "goodput_rps": sum(o.latency <= deadline_s for o in ok) / duration_s,
        "ok_p50_ms": percentile([o.latency for o in ok], 0.50) * 1000,
        "ok_p99_ms": percentile([o.latency for o in ok], 0.99) * 1000,
        "ok_max_ms": max((o.latency for o in ok), default=float("nan")) * 1000,
        "shed_p50_ms": percentile([o.latency for o in shed], 0.50) * 1000,
        "shed_p99_ms": percentile([o.latency for o in shed], 0.99) * 1000,
        "shed_without_retry_after": sum(o.retry_after is None for o in shed),
    }


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    """Resident set size of a process (Linux /proc), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def metric_values(text: str) -> dict[str, float]:
    """Unlabelled samples of a Prometheus text page, and labelled ones as name{k=v,...}."""
    values = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            values[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return values


@dataclass
class Sampler:
    """Samples server RSS and queue depth every `interval_s` while a phase runs."""

    client: httpx.AsyncClient
    pid: int
    interval_s: float = 0.5
    rss: list[float] = field(default_factory=list)
    queue: list[float] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.rss.append(rss_mb(self.pid))
            try:
                text = (await self.client.get("/metrics", timeout=5)).text
                self.queue.append(metric_values(text).get("radar_queue_depth", float("nan")))
            except httpx.HTTPError:
                pass
            await asyncio.sleep(self.interval_s)

    def __enter__(self) -> "Sampler":
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ok(
    process: "subprocess.Popen[bytes]", url: str, timeout_s: float, log: Path | None = None
) -> None:
    """Poll `url` until it answers 200; fail at once if `process` (the server) exited."""
    stop_at = time.monotonic() + timeout_s
    while time.monotonic() < stop_at:
        if process.poll() is not None:
            where = f": see {log}" if log else ""
            raise RuntimeError(f"server exited {process.returncode}{where}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not 200 after {timeout_s} s")


@contextlib.contextmanager
def running(
    command: list[str], log: Path, env: Mapping[str, str] | None = None
) -> Iterator["subprocess.Popen[bytes]"]:
    """Run `command` for the duration of the block, its output into `log`; always stopped
    (TERM, then KILL)."""
    with log.open("wb") as out:
        process = subprocess.Popen(  # noqa: S603 - our own commands
            command, stdout=out, stderr=subprocess.STDOUT, env=None if env is None else dict(env)
        )
        try:
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


@contextlib.contextmanager
def tiny_service(
    settings: Mapping[str, str] | None = None,
    model: tuple[Path, Path] | None = None,
) -> Iterator[tuple[str, int]]:
    """The real service on a loopback port, serving a tiny random router made for the block
    (`make-tiny-model`; or `model`, a model store and its thresholds file), no decision log,
    one torch thread, plus `settings` (RADAR_* variables); yields its URL and process id
    once ready, and stops it after."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        store, thresholds = model or (Path(tmp) / "tiny", ROOT / "thresholds/tiny.yaml")
        if model is None:
            subprocess.run(  # noqa: S603 - our own interpreter and arguments
                [sys.executable, "-m", "app.cli", "make-tiny-model", str(store)],
                check=True,
                cwd=ROOT,
            )
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "RADAR_DECISION_LOG_PATH": "", "RADAR_TORCH_THREADS": "1"}
        env.update(settings or {})
        command = [sys.executable, "-m", "app.cli", "serve", "--port", str(port)]
        command += ["--model-dir", str(store), "--thresholds", str(thresholds)]
        with subprocess.Popen(command, env=env, cwd=ROOT, stderr=subprocess.DEVNULL) as server:  # noqa: S603
            try:
                wait_ok(server, f"{url}/readyz", timeout_s=120)
                yield url, server.pid
            finally:
                server.terminate()


class Server:
    """`python -m app.cli serve` on a loopback port, as a subprocess with its own log."""

    def __init__(
        self, args: list[str], env: dict[str, str], log: Path, cpus: set[int] | None = None
    ) -> None:
        self.log = log
        # Pinned before exec: every thread the server starts inherits the CPU set.
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        with log.open("wb") as out:
            self.process = subprocess.Popen(  # noqa: S603  (our own CLI)
                [sys.executable, "-m", "app.cli", "serve", *args],
                cwd=ROOT,
                env={**os.environ, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=pin,
            )

    def wait_ready(self, url: str, timeout_s: float = 120) -> None:
        wait_ok(self.process, f"{url}/readyz", timeout_s, log=self.log)

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM, then the exit status (SIGKILL after `timeout_s`)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


def table(rows: list[dict[str, Any]], columns: list[str], fmt: Callable[[Any], str]) -> str:
    """A plain-text table: one row per phase."""
    cells = [[fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)
