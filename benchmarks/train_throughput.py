"""Training throughput beside forward-only throughput of the same router, in one run.

Issue 3's speed goal: a training step (forward + backward + AdamW, the trainer's loss) runs at
≥ 1/5 of the forward-only rate. Posts are ~64-token texts (and, for the dual encoder, one
224² image on every fourth post).

    python benchmarks/train_throughput.py --config configs/text_minilm.json
    python benchmarks/train_throughput.py --config configs/dual_minilm_effnetlite0.json
"""

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image

from app.model.config import RouterConfig
from app.model.post import Post
from app.model.store import new_router
from app.training.losses import router_loss

TEXT = (
    "limited offer: buy cheap followers and likes today, click the link in my bio, "
    "free giveaway for everyone who shares this post with three friends before midnight, "
    "winners announced tomorrow on the live stream, do not miss the chance of your life"
)


def make_posts(n: int, with_images: bool) -> list[Post]:
    image = Image.new("RGB", (320, 240), (120, 40, 200))
    return [
        Post(title=f"{i} {TEXT}", images=(image,) if with_images and i % 4 == 0 else ())
        for i in range(n)
    ]


def rate(step: callable, batch: int, seconds: float) -> float:
    """Posts/s of `step` over at least `seconds` after one warm-up call."""
    step()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        step()
        done += batch
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="router.json to build")
    parser.add_argument("--batch-size", type=int, default=32, help="posts per step (32)")
    parser.add_argument("--seconds", type=float, default=8.0, help="time per measurement")
    parser.add_argument("--no-lora", action="store_true", help="full fine-tune of the backbone")
    args = parser.parse_args()
    config = RouterConfig.model_validate_json(args.config.read_bytes())
    if args.no_lora:
        config = config.model_copy(update={"lora": None})
    router = new_router(config, args.config.parent)
    if args.no_lora:
        for param in router.parameters():
            param.requires_grad_(True)
    posts = make_posts(args.batch_size, config.backbone.family == "dual_encoder")
    inputs = router.build_inputs(posts)
    k = len(config.categories)
    labels = torch.randint(-1, 2, (args.batch_size, k))
    teacher = torch.rand(args.batch_size, k)
    optimizer = torch.optim.AdamW([p for p in router.parameters() if p.requires_grad], lr=1e-5)

    def forward_only() -> None:
        with torch.inference_mode():
            router(inputs)

    def train_step() -> None:
        loss = router_loss(router(inputs), labels, teacher, torch.ones_like(teacher).bool())
        loss.total.backward()
        optimizer.step()
        optimizer.zero_grad()

    router.eval()
    forward = rate(forward_only, args.batch_size, args.seconds)
    router.train()
    training = rate(train_step, args.batch_size, args.seconds)
    trainable = sum(p.numel() for p in router.parameters() if p.requires_grad)
    result = {
        "config": str(args.config),
        "lora": None if config.lora is None else config.lora.r,
        "batch": args.batch_size,
        "tokens": int(inputs["attention_mask"].sum(1).float().mean()),
        "trainable_params": trainable,
        "threads": torch.get_num_threads(),
        "forward_posts_per_s": round(forward, 1),
        "train_posts_per_s": round(training, 1),
        "ratio": round(training / forward, 3),
        "goal_met": training / forward >= 0.2,
    }
    print("| config | LoRA r | batch | tokens | forward posts/s | train posts/s | ratio | ≥ 1/5 |")
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.config.name} | {result['lora'] or 'full'} | {args.batch_size} | "
        f"{result['tokens']} | {result['forward_posts_per_s']} | {result['train_posts_per_s']} "
        f"| {result['ratio']} | {'met' if result['goal_met'] else 'NOT met'} |"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
