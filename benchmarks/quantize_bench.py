"""The int8 CPU router against its float32 source, in one process: speed and score drift.

Loads the float32 store, the int8 store (`radar quantize`) and, with `--torchao`, the float32
router with torchao's int8 dynamic-activation int8-weight config applied in eager mode to its
text encoder's Linear layers (the runtime `radar quantize` did not pick; torchao must be
installed). Each repetition times every model in turn on the same batch (interleaved, so a
machine that slows down slows all of them), for the whole `predict_proba` (tokenising, forward,
lexical head: what `/route` runs) and the neural forward alone. Posts are serving_bench.py's
(a title and 48 words of OCR text, 57 tokens); `--data` adds the score differences on the
first `--drift-posts` posts of a JSONL file.

Usage:
    python benchmarks/quantize_bench.py --fp32 model_store/proxy --int8 model_store/proxy-int8 \
        --torchao --data data/proxy-full/val.jsonl --json docs/bench/quantize_proxy.json
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the service sets it

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serving_bench import bodies  # noqa: E402

from app.model.post import Post  # noqa: E402
from app.model.router import Router  # noqa: E402
from app.model.store import load_router  # noqa: E402


def text_posts(count: int, words: int) -> list[Post]:
    out = []
    for body in bodies(count, 0, words):
        post = json.loads(body)
        out.append(Post(title=post["title"], ocr_text=post["ocr_text"]))
    return out


def torchao_router(store: Path) -> Router:
    """The float32 router with torchao int8 dynamic quantization on the text encoder."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    router = load_router(store)

    def text_linear(module: torch.nn.Module, name: str) -> bool:
        return isinstance(module, torch.nn.Linear) and name.startswith("text_encoder.")

    quantize_(router.base_backbone, Int8DynamicActivationInt8WeightConfig(), filter_fn=text_linear)
    return router


def timed(call: Any) -> float:
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000


def speed(models: dict[str, Router], posts: list[Post], batch: int, reps: int) -> dict[str, Any]:
    chunk = posts[:batch]
    inputs = {name: router.build_inputs(chunk) for name, router in models.items()}
    whole: dict[str, list[float]] = {name: [] for name in models}
    forward: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for router in models.values():  # warm-up at this shape
            router.predict_proba(chunk)
        for _ in range(reps):
            for name, router in models.items():
                whole[name].append(timed(lambda r=router: r.predict_proba(chunk)))
                forward[name].append(timed(lambda r=router, n=name: r(inputs[n])))
    return {
        name: {
            "predict_ms": statistics.median(whole[name]),
            "predict_ms_range": [min(whole[name]), max(whole[name])],
            "forward_ms": statistics.median(forward[name]),
            "forward_ms_range": [min(forward[name]), max(forward[name])],
            "posts_per_s": batch * 1000 / statistics.median(whole[name]),
        }
        for name in models
    }


def drift(models: dict[str, Router], data: Path, count: int) -> dict[str, Any]:
    """Max and mean |p - p_fp32| over the first `count` text posts of `data` (batches of 32)."""
    posts = []
    with data.open() as lines:
        for line in lines:
            record = json.loads(line)
            if not record.get("images"):
                posts.append(Post(title=record["title"], ocr_text=record["ocr_text"]))
            if len(posts) == count:
                break
    # torchao's eager int8 takes seconds a batch here: its drift is left out (speed only).
    models = {name: router for name, router in models.items() if name != "torchao"}
    scores = {}
    for name, router in models.items():
        scores[name] = torch.cat(
            [router.predict_proba(posts[i : i + 32]) for i in range(0, count, 32)]
        )
    out = {}
    for name in models:
        if name == "fp32":
            continue
        diff = (scores[name] - scores["fp32"]).abs()
        # Activation scales are per batch: the same post alone against within its batch of 32.
        alone = torch.cat([models[name].predict_proba([post]) for post in posts[:64]])
        batch_effect = (alone - scores[name][:64]).abs().max().item()
        out[name] = {
            "posts": len(posts),
            "max": diff.max().item(),
            "mean": diff.mean().item(),
            "alone_vs_batch_max_64_posts": batch_effect,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fp32", type=Path, required=True, help="the float32 model store")
    p.add_argument(
        "--int8", type=Path, nargs="+", required=True, help="its `radar quantize` store(s)"
    )
    p.add_argument("--torchao", action="store_true", help="add torchao int8 on the fp32 router")
    p.add_argument("--reps", type=int, default=7, help="interleaved repetitions per batch size")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--words", type=int, default=48, help="OCR words per post (48: 57 tokens)")
    p.add_argument("--threads", type=int, default=2, help="torch (and ONNX Runtime) threads")
    p.add_argument("--data", type=Path, help="JSONL whose text posts measure the score drift")
    p.add_argument("--drift-posts", type=int, default=512)
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = {"fp32": load_router(args.fp32)}
    models |= {f"int8:{path.name}": load_router(path) for path in args.int8}
    if args.torchao:
        models["torchao"] = torchao_router(args.fp32)
    posts = text_posts(64, args.words)
    result: dict[str, Any] = {
        "fp32": str(args.fp32),
        "int8": [str(path) for path in args.int8],
        "threads": args.threads,
        "tokens_per_post": float(models["fp32"].build_inputs(posts)["attention_mask"].sum() / 64),
        "speed": {str(b): speed(models, posts, b, args.reps) for b in args.batches},
    }
    if args.data is not None:
        result["drift"] = drift(models, args.data, args.drift_posts)
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
