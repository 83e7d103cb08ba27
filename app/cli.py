"""The `radar` command: thin over the packages (`radar <command> --help` for each)."""

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ValidationError

from app.model.errors import ModelStoreError

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except ModelStoreError as exc:
        print(f"radar {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
