"""The `radar` command: thin over the packages (`radar <command> --help` for each)."""

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from app.model.errors import ModelStoreError

if TYPE_CHECKING:
    from app.training.config import TrainConfig

Handler = Callable[[argparse.Namespace], int]


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.model.store import read_config
    from app.service.app import create_app
    from app.service.settings import Settings

    overrides = {
        k: v
        for k, v in (
            ("host", args.host),
            ("port", args.port),
            ("model_dir", args.model_dir),
            ("thresholds_path", args.thresholds),
        )
        if v is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        for err in exc.errors():
            name = "RADAR_" + "_".join(map(str, err["loc"])).upper() if err["loc"] else "settings"
            print(f"radar serve: {name}: {err['msg']}", file=sys.stderr)
        return 2
    read_config(settings.model_dir)  # fail before uvicorn starts when the store is broken
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=30,
    )
    return 0


def _make_tiny_model(args: argparse.Namespace) -> int:
    from app.model.tiny import make_tiny_router

    out = make_tiny_router(Path(args.out_dir), categories=tuple(args.categories), seed=args.seed)
    print(f"tiny Qwen3-VL router written to {out}")
    return 0


def _train_config(args: argparse.Namespace, **fixed: Any) -> "TrainConfig":
    from app.training.config import TrainConfig

    fields = {name: getattr(args, name) for name in TrainConfig.model_fields if hasattr(args, name)}
    fields = {k: v for k, v in fields.items() if v is not None} | fixed
    return TrainConfig(**fields)


def _train(args: argparse.Namespace) -> int:
    from app.training.trainer import train

    result = train(_train_config(args))
    if _is_main_process():
        print(
            f"router saved to {result.out} after {result.steps} steps "
            f"({result.samples_per_s:.1f} samples/s)"
        )
    return 0


def _is_main_process() -> bool:
    """Rank 0 under `accelerate launch` / torchrun; True when run alone."""
    return os.environ.get("RANK", "0") == "0"


def _train_expert(args: argparse.Namespace) -> int:
    from app.training.trainer import train

    # An expert: one category, its own pipeline's samples, no teacher.
    result = train(_train_config(args, categories=(args.category,), lam=0.0))
    if _is_main_process():
        print(f"expert for {args.category!r} saved to {result.out} after {result.steps} steps")
    return 0


def _teach(args: argparse.Namespace) -> int:
    from app.training.teach import teach

    stats = teach(
        args.experts,
        args.data,
        args.out,
        batch_size=args.batch_size,
        device=args.device,
        resume=not args.no_resume,
    )
    print(f"teacher scores written to {args.out}: {stats}")
    return 0


def _add_training_flags(parser: argparse.ArgumentParser, *, expert: bool) -> None:
    """One flag per knob of TrainConfig; defaults are the paper's (see app/training/config)."""
    from app.training.config import TrainConfig

    f = TrainConfig.model_fields

    def flag(name: str, **kwargs: Any) -> None:
        field = f[name]
        default = field.default if field.default is not None else "none"
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            help=f"{field.description or name} (default: {default})",
            **kwargs,
        )

    parser.add_argument("--data", type=Path, required=True, help=f["data"].description)
    parser.add_argument(
        "--model-config",
        dest="model_config_path",
        type=Path,
        required=True,
        help="router.json (or a model-store dir) to start from: backbone, "
        "head and LoRA settings; LoRA and heads start fresh",
    )
    parser.add_argument("--out", type=Path, required=True, help="model-store directory to write")
    flag("val", type=Path)
    flag("model_version")
    if not expert:
        parser.add_argument(
            "--lambda",
            dest="lam",
            type=float,
            metavar="λ",
            help="distillation weight: L = (1-λ)·masked BCE + λ·KL(teacher ‖ "
            "router); λ > 0 needs teacher scores from `radar teach` (default 0.5)",
        )
        parser.add_argument(
            "--no-mask",
            dest="use_mask",
            action="store_false",
            default=None,
            help="the paper's 'BCE w/o mask' baseline: -1 labels count as 0",
        )
    for name, kind in (
        ("lr", float),
        ("head_lr", float),
        ("weight_decay", float),
        ("warmup_ratio", float),
        ("max_grad_norm", float),
        ("batch_size", int),
        ("grad_accum", int),
        ("epochs", int),
        ("max_steps", int),
        ("seed", int),
        ("log_every", int),
        ("eval_every", int),
        ("checkpoint_every", int),
    ):
        flag(name, type=kind)
    flag("resume", type=Path)
    for name in ("gradient_checkpointing", "skip_bad", "record_seen"):
        flag(name, action="store_true", default=None)
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", default=None, help="no progress bar"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="radar", description="RADAR: risk-aware router for content moderation."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="serve POST /route (settings from RADAR_* environment variables)",
        description="Start the HTTP service. Every setting also reads RADAR_<NAME> from the "
        "environment (see README); flags here override the most common ones.",
    )
    serve.add_argument("--host", help="bind address (RADAR_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (RADAR_PORT, default 8000)")
    serve.add_argument("--model-dir", type=Path, help="model-store directory (RADAR_MODEL_DIR)")
    serve.add_argument("--thresholds", type=Path, help="thresholds YAML (RADAR_THRESHOLDS_PATH)")
    serve.set_defaults(handler=_serve)

    tiny = commands.add_parser(
        "make-tiny-model",
        help="write a tiny random Qwen3-VL router (tests, smoke runs)",
        description="Write a tiny Qwen3-VL router with random weights and an offline tokenizer "
        "and image processor into OUT_DIR, in the model-store layout.",
    )
    tiny.add_argument("out_dir", metavar="OUT_DIR", help="model-store directory to create")
    tiny.add_argument(
        "--categories",
        nargs="+",
        default=["lqc", "rcs", "fe"],
        help="category names (default: lqc rcs fe)",
    )
    tiny.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    tiny.set_defaults(handler=_make_tiny_model)

    train = commands.add_parser(
        "train",
        help="train a router: masked BCE + expert distillation, LoRA",
        description="Train a router on a JSONL file (DESIGN.md's format) with "
        "L = (1 - λ)·masked BCE + λ·KL to the teacher scores; saves a model-store directory. "
        "Runs as is on one device, or under `accelerate launch` for several.",
    )
    _add_training_flags(train, expert=False)
    train.set_defaults(handler=_train)

    expert = commands.add_parser(
        "train-expert",
        help="train a one-category expert (the paper's per-category teacher)",
        description="Train a K = 1 router on the samples annotated for one category.",
    )
    expert.add_argument("--category", required=True, help="the expert's category")
    _add_training_flags(expert, expert=True)
    expert.set_defaults(handler=_train_expert)

    teach = commands.add_parser(
        "teach",
        help="score every sample with every expert: writes `teacher` probabilities",
        description="Score every sample of DATA with each expert router and write the JSONL "
        "with `teacher` = {category: probability} added; labels stay untouched.",
    )
    teach.add_argument(
        "--experts",
        type=Path,
        nargs="+",
        required=True,
        help="expert model-store directories (one category each)",
    )
    teach.add_argument("--data", type=Path, required=True, help="input JSONL")
    teach.add_argument("--out", type=Path, required=True, help="output JSONL")
    teach.add_argument("--batch-size", type=int, default=32, help="posts per forward (32)")
    teach.add_argument("--device", default="cpu", help="cpu or cuda (cpu)")
    teach.add_argument(
        "--no-resume", action="store_true", help="start over instead of continuing a partial output"
    )
    teach.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave bad input lines out of the output (counted) instead of stopping",
    )
    teach.add_argument("--no-progress", action="store_true", help="no progress bar")
    teach.set_defaults(handler=_teach)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    from app.training.data import DataError
    from app.training.teach import TeachError

    try:
        return handler(args)
    except (ModelStoreError, DataError, TeachError, ValueError) as exc:
        print(f"radar {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
