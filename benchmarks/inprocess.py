"""The in-process ceiling for `serving_bench.py`: the same model's batched forward, no HTTP.

Runs in its own process (`python benchmarks/inprocess.py ...`, JSON on stdout) so that the
load generator of the HTTP phases never carries torch's threads.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

# Before torch loads: the serving process sets the same (app/service/server.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.model.post import Post  # noqa: E402
from app.model.store import load_router  # noqa: E402
from app.service.engine import RouterEngine  # noqa: E402
from app.service.images import ImageLoader  # noqa: E402
from app.service.settings import Settings  # noqa: E402
from app.thresholds import ActiveThresholds, load_thresholds  # noqa: E402


def to_posts(bodies: list[bytes]) -> list[Post]:
    """`/route` bodies → model posts, images decoded by the service's own loader."""
    loader = ImageLoader(Settings())
    posts = []
    for body in bodies:
        post = json.loads(body)
        images = tuple(
            loader.decode_base64(post["post_id"], f"images[{i}].data", image["data"])
            for i, image in enumerate(post.get("images", []))
        )
        posts.append(Post(title=post["title"], ocr_text=post["ocr_text"], images=images))
    return posts


def measure(
    engine: RouterEngine,
    thresholds: ActiveThresholds,
    posts: list[Post],
    batch: int,
    seconds: float,
) -> dict[str, float]:
    """Forwards of `batch` posts (cycling through `posts`) for at least `seconds`."""
    batches = [[posts[(i + j) % len(posts)] for j in range(batch)] for i in range(len(posts))]
    with torch.inference_mode():
        engine.route(batches[0], thresholds)  # warm-up at this shape
        done, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds or done < 3:
            engine.route(batches[done % len(batches)], thresholds)
            done += 1
    return {
        "batch": batch,
        "forwards": done,
        "forward_ms": elapsed / done * 1000,
        "posts_per_s": done * batch / elapsed,
    }


def mean_tokens(engine: RouterEngine, posts: list[Post]) -> float:
    """Mean non-padding tokens per post, as the backbone builds them."""
    inputs = engine.router.backbone.build_inputs(posts)
    mask = inputs.get("attention_mask")
    return float(mask.sum() / len(posts)) if mask is not None else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--thresholds", type=Path, required=True)
    p.add_argument("--bodies", type=Path, required=True, help="JSON list of /route bodies")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--seconds", type=float, default=10.0, help="per batch size")
    args = p.parse_args(argv)

    router = load_router(args.model_dir)
    config = router.config
    thresholds = load_thresholds(args.thresholds, config.categories, config.model_version)
    engine = RouterEngine(router)
    engine.warm_up()
    bodies = [body.encode() for body in json.loads(args.bodies.read_text())]
    posts = to_posts(bodies)
    rows = [measure(engine, thresholds, posts, b, args.seconds) for b in args.batches]
    result = {
        "torch_threads": torch.get_num_threads(),
        "tokens_per_post": mean_tokens(engine, posts),
        "forward": rows,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
