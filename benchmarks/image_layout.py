"""The image encoder's batch layout on the CPU (issue 15, item 0), side by side in one run.

Times, per image, EfficientNet-Lite0 as the shipped router loads it (`model_store/proxy`):
the whole batch in the default NCHW layout (the previous code), and `ImageEncoder.forward`
(channels-last, `CPU_IMAGE_CHUNK` images at a time), at several batch sizes; then the
router's own `predict_proba` on posts with `--images` images each, one post at a time against
batches of `--batch-size`, in posts per second (a batch must not be slower per post).

    python benchmarks/image_layout.py --threads 2 --images 2
"""

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.model.post import Post  # noqa: E402
from app.model.store import load_router  # noqa: E402


def per_call_s(work: Callable[[], object], repeats: int) -> float:
    """The best of `repeats` timed calls after one warm-up (the least disturbed by others)."""
    work()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def image_post(i: int, images: int) -> Post:
    pictures = tuple(
        Image.new("RGB", (640, 480), ((37 * i + 11 * k) % 256, 90, 160)) for k in range(images)
    )
    return Post(title=f"post {i} with pictures", ocr_text="some text", images=pictures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "model_store" / "proxy")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    parser.add_argument("--images", type=int, default=2, help="images per post (2)")
    parser.add_argument("--batch-size", type=int, default=32, help="posts per batch (32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per figure (3)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    router = load_router(args.model_dir, torch.device("cpu"))
    encoder = router.base_backbone.image_encoder
    size = router.base_backbone.config.image_size
    nchw = copy.deepcopy(encoder.net)  # the previous code: whole batch, default layout

    print(
        f"image encoder, ms per image ({size} px, {args.threads} threads, best of {args.repeats})"
    )
    print(f"{'images':>6}  {'NCHW whole batch':>16}  {'channels-last chunks':>20}  speed-up")
    with torch.inference_mode():
        for n in (1, 8, 32, 64):
            pixels = torch.randn(n, 3, size, size)
            before = per_call_s(
                lambda p=pixels: nchw.extract_features(p).mean(dim=(2, 3)), args.repeats
            )
            now = per_call_s(lambda p=pixels: encoder(p), args.repeats)
            ms_before, ms_now = before / n * 1000, now / n * 1000
            print(f"{n:>6}  {ms_before:>16.1f}  {ms_now:>20.1f}  {before / now:>7.2f}x")

    posts = [image_post(i, args.images) for i in range(args.batch_size)]
    one = per_call_s(lambda: router.predict_proba(posts[:1]), args.repeats)
    batch = per_call_s(lambda: router.predict_proba(posts), args.repeats)
    print(
        f"\nrouter predict_proba, posts with {args.images} images: one post "
        f"{1 / one:.1f} posts/s, a batch of {args.batch_size} {args.batch_size / batch:.1f} posts/s"
    )


if __name__ == "__main__":
    main()
