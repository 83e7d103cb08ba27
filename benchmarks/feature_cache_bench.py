"""What the image-feature cache saves in training: images encoded, wall and CPU time.

Trains the same router three times on the same small set of memes (real images with their OCR
text, from `../shared/data/propaganda_memes`): without a cache, with an empty cache (cold), and
with the cache the cold run filled (warm). Prints the images the image encoder was given, the
wall time of each run, and how far the warm run's weights are from the cold run's (0: the
cache changes nothing but the time) and from the uncached run's (the encoder's own batch
noise, ~1e-5: without a cache an image is re-encoded in other batches each epoch).

    python benchmarks/feature_cache_bench.py         # real MiniLM + EfficientNet-Lite0
    python benchmarks/feature_cache_bench.py --posts 32 --epochs 3 --batch-size 16
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.model.backbones.dual_encoder import ImageEncoder  # noqa: E402
from app.training.config import TrainConfig  # noqa: E402
from app.training.trainer import train  # noqa: E402

MEMES = REPO.parent / "shared/data/propaganda_memes/data/datasets/propaganda/defaults"
CONFIG = REPO / "configs/dual_minilm_effnetlite0.json"


def write_memes(out: Path, posts: int) -> Path:
    """The first `posts` training memes as RADAR JSONL, labelled for `smear` only."""
    lines = []
    with (MEMES / "annotations" / "train.jsonl").open() as file:
        for raw in file:
            if len(lines) == posts:
                break
            meme = json.loads(raw)
            record = {
                "post_id": f"meme-{meme['id']}",
                "ocr_text": meme["text"],
                "images": [str(MEMES / "images" / meme["image"])],
                "labels": {"smear": int("Smears" in meme["labels"])},
            }
            lines.append(json.dumps(record))
    path = out / "memes.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


class Counter:
    images = 0


def count_encodes() -> Counter:
    counter = Counter()
    original = ImageEncoder.forward

    def counting(self: ImageEncoder, pixel_values: torch.Tensor) -> torch.Tensor:
        counter.images += pixel_values.shape[0]
        return original(self, pixel_values)

    ImageEncoder.forward = counting  # type: ignore[method-assign]
    return counter


def weights(store: Path) -> dict[str, torch.Tensor]:
    return load_file(store / "head.safetensors") | load_file(
        store / "adapter" / "adapter_model.safetensors"
    )


def max_difference(one: dict[str, torch.Tensor], two: dict[str, torch.Tensor]) -> float:
    return max(float((one[k] - two[k]).abs().max()) for k in one)


def per_image_costs(data: Path, model_config: Path, cache_dir: Path) -> dict[str, float]:
    """Milliseconds per image of each step a cache hit skips or adds, on the same memes."""
    from app.data.records import load_image, load_records
    from app.model.backbones.dual_encoder import DualEncoderBackbone, preprocess_image
    from app.model.config import read_config_file
    from app.model.feature_cache import image_digest
    from app.model.store import new_router

    config = read_config_file(model_config)
    records = list(load_records(data, config.categories, allow_other_categories=True).records)
    backbone = new_router(config, model_config.parent).base_backbone
    assert isinstance(backbone, DualEncoderBackbone)
    backbone.use_feature_cache(cache_dir)
    cache = backbone.feature_cache
    assert cache is not None
    identity = backbone._cache_identity(cache)
    size = config.backbone.image_size

    def timed(step: Any) -> tuple[list[Any], float]:
        started = time.perf_counter()
        out = [step(x) for x in items]
        return out, 1000 * (time.perf_counter() - started) / len(items)

    items: list[Any] = records
    images, decode = timed(lambda r: load_image(r, 0))
    items = images
    keys, digest = timed(image_digest)
    pixels, preprocess = timed(lambda i: preprocess_image(i, size))
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(pixels), 16):
            backbone.image_encoder(torch.stack(pixels[start : start + 16]))
    encode = 1000 * (time.perf_counter() - started) / len(pixels)
    items = keys
    _, read = timed(lambda k: cache.get(identity, k, backbone.image_encoder.hidden_size))
    return {
        "decode": decode,
        "digest": digest,
        "preprocess": preprocess,
        "encode (batch 16)": encode,
        "cache read": read,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model-config", type=Path, default=CONFIG)
    args = parser.parse_args()
    counter = count_encodes()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        data = write_memes(root, args.posts)
        runs: dict[str, dict[str, Any]] = {}
        plan = (("no cache", None), ("cold cache", root / "cache"), ("warm cache", root / "cache"))
        for name, cache in plan:
            counter.images = 0
            cfg = TrainConfig(
                data=data,
                model_config_path=args.model_config,
                out=root / name.replace(" ", "-"),
                categories=("smear",),
                lam=0.0,
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=1e-4,
                progress=False,
                log_every=1000,
                feature_cache=cache,
            )
            started, cpu = time.perf_counter(), time.process_time()
            result = train(cfg)
            runs[name] = {
                "images encoded": counter.images,
                "wall s": time.perf_counter() - started,
                # CPU seconds of all threads: steadier than wall time on a shared machine.
                "cpu s": time.process_time() - cpu,
            }
            runs[name]["weights"] = weights(result.out)
        entries = list((root / "cache").rglob("*.safetensors"))
        cache_bytes = sum(p.stat().st_size for p in entries)
        costs = per_image_costs(data, args.model_config, root / "cache")
    print(
        f"{args.posts} posts, one image each, {args.epochs} epochs, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads"
    )
    for name, run in runs.items():
        print(
            f"  {name:10}  images encoded {run['images encoded']:5}   "
            f"wall {run['wall s']:6.1f} s   cpu {run['cpu s']:6.1f} s"
        )
    cold, warm, plain = (runs[n]["weights"] for n in ("cold cache", "warm cache", "no cache"))
    print(f"  max |warm - cold| weight: {max_difference(warm, cold):.3g}")
    print(f"  max |cold - no cache| weight: {max_difference(cold, plain):.3g}")
    print(f"  cache: {len(entries)} entries, {cache_bytes} bytes")
    print("  per image, ms: " + ", ".join(f"{k} {v:.2f}" for k, v in costs.items()))


if __name__ == "__main__":
    main()
