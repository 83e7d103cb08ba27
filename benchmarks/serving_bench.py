"""Serving benchmark: HTTP vs in-process, dynamic batching vs batch-1, RADAR vs LitServe, and
a concurrency sweep (throughput, p50/p99, mean batch, queue wait vs forward), in one run.

All servers serve the same model directory with the same thresholds, the same batch size and
wait, on loopback; one closed-loop load generator (async httpx, N callers each sending again on
its answer) drives each at every concurrency for the same time. The in-process ceiling is the
same model's batched forward (`RouterEngine.route`, what the batcher calls) in its own process.

Usage:
    python benchmarks/serving_bench.py                               # trained default router
    python benchmarks/serving_bench.py --model-dir model_store/tiny \
        --thresholds thresholds/tiny.yaml
    python benchmarks/serving_bench.py --images 1 --seconds 10 --json out.json --markdown out.md
    python benchmarks/serving_bench.py --litserve none        # RADAR only (no `bench` extra)
    python benchmarks/serving_bench.py --int8-model-dir model_store/proxy-int8 \
        --int8-thresholds thresholds/proxy-int8.yaml --images 0 2 --litserve manager

The last form is the side-by-side run (issue 15, item 3): for each `--images` count, the
in-process ceilings of both stores, RADAR on each, and LitServe on the int8 one, with each goal
marked met or not.
"""

import argparse
import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import loadgen
import serving_report
from PIL import Image

HERE = Path(__file__).resolve().parent
TEXT = (
    "limited offer click the link in bio to win free followers and cheap likes today only "
    "my cat found a sunny spot on the balcony again look at her sleeping so peacefully "
    "you people are all idiots and should be banned from this site forever and ever "
    "homemade pasta with fresh basil tomatoes garlic and a little olive oil for dinner"
)
WORDS = TEXT.split()


def bodies(count: int, images: int, words: int) -> list[bytes]:
    """`/route` bodies: a title, `words` words of OCR text (~64 MiniLM tokens at 48), and
    `images` small JPEGs each; posts differ so no cache could help."""
    out = []
    for i in range(count):
        text = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(words))
        pictures = []
        for j in range(images):
            buffer = io.BytesIO()
            Image.new("RGB", (320, 240), (i * 37 % 256, j * 80 % 256, 120)).save(buffer, "JPEG")
            pictures.append({"data": base64.b64encode(buffer.getvalue()).decode()})
        post = {"post_id": f"b{i}", "title": f"post {i}", "ocr_text": text, "images": pictures}
        out.append(json.dumps(post).encode())
    return out


def inprocess(args: argparse.Namespace, bodies_file: Path) -> dict[str, Any]:
    command = [sys.executable, str(HERE / "inprocess.py"), "--model-dir", str(args.model_dir)]
    command += ["--thresholds", str(args.thresholds), "--bodies", str(bodies_file)]
    command += ["--batches", "1", str(args.max_batch_size), "--seconds", str(args.seconds)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)  # noqa: S603
    return json.loads(done.stdout.strip().splitlines()[-1])


def server_metrics(url: str) -> dict[str, float]:
    """RADAR's Prometheus figures; {} for a server without them (LitServe)."""
    try:
        response = httpx.get(f"{url}/metrics", timeout=10)
    except httpx.HTTPError:
        return {}
    return loadgen.metric_values(response.text) if response.status_code == 200 else {}


def _delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


async def sweep(
    name: str, url: str, path: str, posts: list[bytes], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Closed loop at each concurrency; RADAR's own metrics give batch size and time split."""
    rows = []
    client = loadgen.ShardedClient(url, timeout=120)
    try:
        await loadgen.closed_loop(client, path, posts, 8, 2.0)  # connections, warm-up
        for callers in args.concurrency:
            window = loadgen.Window()
            load = asyncio.create_task(
                loadgen.closed_loop(client, path, posts, callers, args.seconds, 1.0, window)
            )
            # The server's figures over the measured window (the load runs on meanwhile).
            await window.opened.wait()
            before, cpu_before = await asyncio.to_thread(server_metrics, url), time.process_time()
            await window.closed.wait()
            after = await asyncio.to_thread(server_metrics, url)
            client_cpu = time.process_time() - cpu_before
            outcomes = await load
            ok = [o.latency for o in outcomes if o.status == 200]
            row: dict[str, Any] = {
                "server": name,
                "concurrency": callers,
                "requests": len(outcomes),
                "errors": len(outcomes) - len(ok),
                "posts_per_s": len(ok) / args.seconds,
                "p50_ms": loadgen.percentile(ok, 0.50) * 1000,
                "p99_ms": loadgen.percentile(ok, 0.99) * 1000,
                "client_cpu_pct": 100 * client_cpu / args.seconds,
            }
            batches = _delta(before, after, "radar_batch_size_count")
            if batches:
                row["mean_batch"] = _delta(before, after, "radar_batch_size_sum") / batches
                row["forward_ms"] = (
                    _delta(before, after, "radar_forward_duration_seconds_sum") / batches * 1000
                )
                waited = _delta(before, after, "radar_queue_wait_seconds_count")
                row["queue_wait_ms"] = (
                    _delta(before, after, "radar_queue_wait_seconds_sum") / waited * 1000
                )
                for outcome in ("used", "redone"):
                    counter = f"radar_prepared_ahead_total{{outcome={outcome}}}"
                    row[f"prepared_ahead_{outcome}"] = _delta(before, after, counter)
            rows.append(row)
            print(serving_report.sweep_line(row), flush=True)
    finally:
        await client.aclose()
    return rows


def radar_server(
    args: argparse.Namespace, max_batch: int, workdir: Path
) -> tuple[loadgen.Server, str]:
    workdir.mkdir(parents=True, exist_ok=True)
    port = loadgen.free_port()
    env = {
        "RADAR_MAX_BATCH_SIZE": str(max_batch),
        "RADAR_MAX_WAIT_MS": str(args.max_wait_ms),
        "RADAR_QUEUE_SIZE": str(max(1024, max_batch)),
        # A throughput benchmark: nothing may time out at concurrency 128 on batch-1.
        "RADAR_DEADLINE_MS": "120000",
        "RADAR_LOG_LEVEL": "warning",
        "RADAR_THRESHOLDS_POLL_S": "3600",
        # No load balancer to drain from: stop at once rather than serve 5 more seconds.
        "RADAR_SHUTDOWN_GRACE_S": "0",
        **dict(kv.split("=", 1) for kv in args.server_env),
    }
    argv = ["--port", str(port), "--model-dir", str(args.model_dir)]
    argv += ["--thresholds", str(args.thresholds)]
    server = loadgen.Server(argv, env, workdir / f"radar-batch{max_batch}.log")
    return server, f"http://127.0.0.1:{port}"


async def run_radar(
    args: argparse.Namespace, max_batch: int, posts: list[bytes], workdir: Path
) -> list[dict[str, Any]]:
    server, url = radar_server(args, max_batch, workdir)
    try:
        server.wait_ready(url)
        return await sweep(f"radar batch<={max_batch}", url, "/route", posts, args)
    finally:
        server.stop()


async def run_litserve(
    args: argparse.Namespace, queue: str, posts: list[bytes], workdir: Path
) -> list[dict[str, Any]]:
    port = loadgen.free_port()
    command = [sys.executable, str(HERE / "litserve_router.py"), "--port", str(port)]
    command += ["--model-dir", str(args.model_dir), "--thresholds", str(args.thresholds)]
    command += ["--max-batch-size", str(args.max_batch_size)]
    command += ["--max-wait-ms", str(args.max_wait_ms), "--timeout-s", "120"]
    if queue == "zmq":
        command.append("--fast-queue")
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"litserve-{queue}.log"
    log = log_path.open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603
    url = f"http://127.0.0.1:{port}"
    try:
        loadgen.wait_ok(process, f"{url}/health", 180, log=log_path)
        label = f"litserve ({queue}) batch<={args.max_batch_size}"
        return await sweep(label, url, "/predict", posts, args)
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _litserve_installed() -> bool:
    try:
        import litserve  # noqa: F401
    except ImportError:
        return False
    return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--model-dir", type=Path, default=loadgen.ROOT / "model_store/proxy")
    p.add_argument("--thresholds", type=Path, default=loadgen.ROOT / "thresholds/proxy.yaml")
    p.add_argument(
        "--images",
        type=int,
        nargs="+",
        default=[0],
        help="JPEGs per post (default 0); several counts only with --int8-model-dir",
    )
    p.add_argument("--words", type=int, default=48, help="OCR words per post (default 48)")
    p.add_argument("--seconds", type=float, default=15.0, help="per measurement (default 15)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument(
        "--litserve",
        choices=["none", "manager", "zmq", "both"],
        default="both",
        help="LitServe baselines: its default multiprocessing-Manager queues, its ZeroMQ "
        "'fast_queue', both (default) or none",
    )
    p.add_argument("--rounds", type=int, default=1, help="repeat everything; report medians")
    p.add_argument("--no-batch1", action="store_true", help="skip the batch-1 RADAR service")
    p.add_argument("--server-env", action="append", default=[], metavar="K=V", help="RADAR env")
    p.add_argument(
        "--int8-model-dir",
        type=Path,
        help="side by side: also serve this (int8) store; LitServe then serves it",
    )
    p.add_argument("--int8-thresholds", type=Path, help="its thresholds (with --int8-model-dir)")
    p.add_argument("--json", type=Path, help="write every figure here")
    p.add_argument("--markdown", type=Path, help="write the tables (with goals) here")
    args = p.parse_args(argv)
    if (args.int8_model_dir is None) != (args.int8_thresholds is None):
        p.error("--int8-model-dir and --int8-thresholds go together")
    if args.int8_model_dir is None and len(args.images) > 1:
        p.error("several --images counts need --int8-model-dir (the side-by-side run)")
    # The servers run from the repository root: hand them absolute paths.
    args.model_dir, args.thresholds = args.model_dir.resolve(), args.thresholds.resolve()
    if args.int8_model_dir is not None:
        args.int8_model_dir = args.int8_model_dir.resolve()
        args.int8_thresholds = args.int8_thresholds.resolve()
    return args


def _litserve_queues(args: argparse.Namespace) -> list[str]:
    queues = {"none": [], "both": ["manager", "zmq"]}.get(args.litserve, [args.litserve])
    if queues and not _litserve_installed():
        print("litserve is not installed (pip install -e '.[bench]'): no LitServe baseline")
        return []
    return queues


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """`--rounds` rounds of every measurement, servers restarted each round; the tables use
    the median of the rounds (this machine's noise between runs is larger than the effects)."""
    workdir = Path(tempfile.mkdtemp(prefix="radar-serving-"))
    posts = bodies(64, args.images[0], args.words)
    bodies_file = workdir / "bodies.json"
    bodies_file.write_text(json.dumps([b.decode() for b in posts]))
    queues = _litserve_queues(args)
    forwards: list[dict[str, Any]] = []
    sweeps: list[dict[str, Any]] = []
    for round_ in range(1, args.rounds + 1):
        print(f"round {round_}/{args.rounds}: in-process forward ({args.model_dir}) ...")
        measured = inprocess(args, bodies_file)
        forwards += [{**row, "round": round_} for row in measured["forward"]]
        print(json.dumps(measured["forward"]), flush=True)
        rows = await run_radar(args, args.max_batch_size, posts, workdir)
        if not args.no_batch1:
            rows += await run_radar(args, 1, posts, workdir)
        for queue in queues:
            rows += await run_litserve(args, queue, posts, workdir)
        sweeps += [{**row, "round": round_} for row in rows]
    return {
        "inprocess": {**measured, "forward": serving_report.medians(forwards, ["batch"])},
        "sweeps": serving_report.medians(sweeps, ["server", "concurrency"]),
        "rounds": {"forward": forwards, "sweeps": sweeps},
        "logs": str(workdir),
    }


def _with_store(args: argparse.Namespace, model_dir: Path, thresholds: Path) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "model_dir": model_dir, "thresholds": thresholds})


def _tagged(rows: list[dict[str, Any]], **tags: Any) -> list[dict[str, Any]]:
    return [{**row, **tags} for row in rows]


async def run_side_by_side(args: argparse.Namespace) -> dict[str, Any]:
    """Issue 15, item 3 in one run: per image count, both stores' in-process ceilings, RADAR on
    each store, LitServe on the int8 one; servers restarted for every sweep, each sweep on the
    same posts, `--rounds` times (medians)."""
    workdir = Path(tempfile.mkdtemp(prefix="radar-side-by-side-"))
    stores = {
        "fp32": (args.model_dir, args.thresholds),
        "int8": (args.int8_model_dir, args.int8_thresholds),
    }
    queues = _litserve_queues(args)
    forwards: list[dict[str, Any]] = []
    sweeps: list[dict[str, Any]] = []
    for round_ in range(1, args.rounds + 1):
        for images in args.images:
            posts = bodies(64, images, args.words)
            bodies_file = workdir / f"bodies-{images}.json"
            bodies_file.write_text(json.dumps([b.decode() for b in posts]))
            for precision, (model_dir, thresholds) in stores.items():
                store_args = _with_store(args, model_dir, thresholds)
                print(f"round {round_}: {images} image(s), {precision} in process ...", flush=True)
                measured = inprocess(store_args, bodies_file)
                tags = {"precision": precision, "images": images, "round": round_}
                forwards += _tagged(measured["forward"], **tags)
                logs = workdir / f"round{round_}-{precision}-{images}img"
                rows = await run_radar(store_args, args.max_batch_size, posts, logs)
                sweeps += _tagged(rows, **tags, server=f"radar {precision}")
            int8_args = _with_store(args, *stores["int8"])
            for queue in queues:
                logs = workdir / f"round{round_}-litserve-{images}img"
                rows = await run_litserve(int8_args, queue, posts, logs)
                tags = {"precision": "int8", "images": images, "round": round_}
                sweeps += _tagged(rows, **tags, server=f"litserve ({queue}) int8")
    return {
        "inprocess": serving_report.medians(forwards, ["precision", "images", "batch"]),
        "sweeps": serving_report.medians(sweeps, ["server", "images", "concurrency"]),
        "rounds": {"forward": forwards, "sweeps": sweeps},
        "logs": str(workdir),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    side_by_side = args.int8_model_dir is not None
    result = asyncio.run(run_side_by_side(args) if side_by_side else run(args))
    result["settings"] = {k: str(v) for k, v in vars(args).items()}
    result["machine"] = {"cpus": os.cpu_count(), "load_average_end": os.getloadavg()}
    result["wall_s"] = round(time.monotonic() - started, 1)
    if side_by_side:
        markdown = serving_report.side_by_side(result, args.max_batch_size)
    else:
        markdown = serving_report.markdown(result, args.max_batch_size, args.max_wait_ms)
    print(markdown)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.markdown:
        args.markdown.write_text(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
