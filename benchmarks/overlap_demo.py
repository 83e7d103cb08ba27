"""Preparing batch n + 1 while batch n runs: the batcher's throughput, serial and overlapped.

The real `DynamicBatcher` and `RouterEngine` on a model store, at saturation (every post
submitted at once): once without a prepare step (inputs built on the model thread before each
forward, as before issue 15) and once with `RouterEngine.prepare` on the preparing thread.
By default the forward is a *test device*: a sleep of `--device-ms` standing in for an
accelerator that does not use the CPU, so the figure shows the schedule (1 / (prepare +
forward) against 1 / max(prepare, forward)) rather than two stages fighting over the same
CPU cores. `--real-forward` runs the model's own forward instead.

    python benchmarks/overlap_demo.py --model-dir model_store/proxy --images 2 --device-ms 500
"""

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from inprocess import to_posts  # noqa: E402
from serving_bench import bodies  # noqa: E402

from app.model.post import Post  # noqa: E402
from app.model.store import load_router  # noqa: E402
from app.service.batcher import DynamicBatcher  # noqa: E402
from app.service.engine import RouterEngine  # noqa: E402
from app.service.metrics import ServiceMetrics  # noqa: E402
from app.thresholds import load_thresholds  # noqa: E402


def test_device(engine: RouterEngine, seconds: float) -> None:
    """Replace the router's forward by a sleep: logits of zeros after `seconds`."""
    k = len(engine.categories)

    def forward(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        time.sleep(seconds)
        return torch.zeros(inputs["input_ids"].shape[0], k)

    engine.router.forward = forward  # type: ignore[method-assign]


def median_prepare_s(engine: RouterEngine, batch: list[Post], times: int = 3) -> float:
    engine.router.prepare(batch)
    spans = []
    for _ in range(times):
        started = time.perf_counter()
        engine.router.prepare(batch)
        spans.append(time.perf_counter() - started)
    return sorted(spans)[len(spans) // 2]


async def posts_per_s(
    engine: RouterEngine, thresholds_path: Path, posts: list[Post], batch: int, overlap: bool
) -> float:
    active = load_thresholds(thresholds_path, engine.categories, engine.router.config.model_version)
    batcher = DynamicBatcher(
        lambda ps: engine.route(ps, active),
        ServiceMetrics(),
        prepare=engine.prepare if overlap else None,
        max_batch_size=batch,
        max_wait_s=0.005,
        queue_size=len(posts),
    )
    batcher.start()
    try:
        deadline = time.monotonic() + 3600
        started = time.perf_counter()
        await asyncio.gather(*(batcher.submit(post, deadline) for post in posts))
        return len(posts) / (time.perf_counter() - started)
    finally:
        await batcher.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=ROOT / "model_store/proxy")
    p.add_argument("--thresholds", type=Path, default=ROOT / "thresholds/proxy.yaml")
    p.add_argument("--images", type=int, default=2, help="JPEGs per post (default 2)")
    p.add_argument("--words", type=int, default=48, help="OCR words per post (default 48)")
    p.add_argument("--batch", type=int, default=32, help="max batch size (default 32)")
    p.add_argument("--batches", type=int, default=6, help="batches per run (default 6)")
    p.add_argument("--device-ms", type=float, default=500.0, help="test device's forward")
    p.add_argument("--real-forward", action="store_true", help="the model's forward instead")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = RouterEngine(load_router(args.model_dir, "cpu"))
    posts = to_posts(bodies(args.batch * args.batches, args.images, args.words))
    prepare_s = median_prepare_s(engine, posts[: args.batch])
    if not args.real_forward:
        test_device(engine, args.device_ms / 1000)
    forward = "the model's" if args.real_forward else f"test device {args.device_ms:g} ms"
    print(f"batch {args.batch}, {args.images} images/post, forward: {forward}")
    print(f"prepare one batch alone: {prepare_s * 1000:.0f} ms")
    for overlap in (False, True):
        rate = asyncio.run(posts_per_s(engine, args.thresholds, posts, args.batch, overlap))
        print(f"{'overlapped' if overlap else 'serial':>10}: {rate:.1f} posts/s")
    if not args.real_forward:
        f = args.device_ms / 1000
        print(
            f"expected: serial {args.batch / (prepare_s + f):.1f}, "
            f"overlapped {args.batch / max(prepare_s, f):.1f} posts/s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
