"""RSS and normal traffic under a stream of worst-case valid images (issue 13, item 3).

Starts the real service (`python -m app.cli serve`: a tiny random router, or `--model-dir`) and
runs two phases of the same normal traffic, one client sending text posts one after another:

- baseline: nothing else;
- attacked: meanwhile `--attackers` clients each send, back to back, requests of 4 PNGs of
  5000 x 5000 pixels (25 M pixels each, the per-image limit; 100 M per request, the request
  budget), ~70 KB each on the wire.

Prints, per phase, the normal posts' status counts and latency percentiles, the attack's
status counts, and the server's RSS (sampled every 0.2 s from /proc): at start, peak, end.

    python benchmarks/image_stream_rss.py --seconds 20 --attackers 4
"""

import argparse
import base64
import io
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.loadgen import tiny_service  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worst_case_body() -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", (5000, 5000), (9, 9, 9)).save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode()
    return {"post_id": "bomb", "images": [{"data": data}] * 4}


def phase(url: str, pid: int, seconds: float, attackers: int) -> dict:
    stop = threading.Event()
    attack: Counter[int] = Counter()
    rss: list[float] = [rss_mib(pid)]

    def attacker() -> None:
        body = worst_case_body()
        with httpx.Client(base_url=url, timeout=60) as client:
            while not stop.is_set():
                attack[client.post("/route", json=body).status_code] += 1

    def sampler() -> None:
        while not stop.is_set():
            rss.append(rss_mib(pid))
            time.sleep(0.2)

    threads = [threading.Thread(target=attacker) for _ in range(attackers)]
    threads.append(threading.Thread(target=sampler))
    for thread in threads:
        thread.start()
    statuses: Counter[int] = Counter()
    latencies = []
    end = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=30) as client:
        i = 0
        while time.monotonic() < end:
            started = time.perf_counter()
            response = client.post("/route", json={"post_id": f"n{i}", "title": "hello there"})
            latencies.append(time.perf_counter() - started)
            statuses[response.status_code] += 1
            i += 1
    stop.set()
    for thread in threads:
        thread.join()
    rss.append(rss_mib(pid))
    ms = np.array(latencies) * 1000
    return {
        "normal": dict(statuses),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "attack": dict(attack),
        "rss_start": rss[0],
        "rss_peak": max(rss),
        "rss_end": rss[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="per phase (20)")
    parser.add_argument("--attackers", type=int, default=4, help="clients sending images (4)")
    parser.add_argument(
        "--model-dir", type=Path, help="serve this model store (default: a tiny random router)"
    )
    parser.add_argument("--thresholds", type=Path, help="its thresholds file (with --model-dir)")
    args = parser.parse_args()
    if (args.model_dir is None) != (args.thresholds is None):
        parser.error("--model-dir and --thresholds go together")
    model = None if args.model_dir is None else (args.model_dir, args.thresholds)
    with tiny_service(model=model) as (url, pid):
        results = {
            "baseline": phase(url, pid, args.seconds, 0),
            "attacked": phase(url, pid, args.seconds, args.attackers),
        }
    print(
        f"{'phase':<10} {'normal status':<16} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'attack status':<22} {'RSS start/peak/end MiB':>24}"
    )
    for name, r in results.items():
        rss = f"{r['rss_start']:.0f} / {r['rss_peak']:.0f} / {r['rss_end']:.0f}"
        print(
            f"{name:<10} {r['normal']!s:<16} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
            f"{r['attack']!s:<22} {rss:>24}"
        )


if __name__ == "__main__":
    main()
