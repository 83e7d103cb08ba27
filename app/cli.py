"""The `radar` command: thin over the packages (`radar <command> --help` for each)."""

import argparse
import importlib
import inspect
import logging
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from app.cli_ops import add_operations_commands
from app.model.errors import ModelStoreError

if TYPE_CHECKING:
    from app.training.config import TrainConfig

Handler = Callable[[argparse.Namespace], int]
# Parsed names that are the CLI's own, never a parameter of the function a command calls.
CLI_ONLY = frozenset({"command", "handler", "target", "command_line"})


def calls(module: str, name: str) -> str:
    """The `target` of a subcommand: `module:name`, imported only when the command runs
    (importing the training or evaluation modules for every command would load torch)."""
    return f"{module}:{name}"


def resolve_target(target: str) -> Callable[..., Any]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def call_target(args: argparse.Namespace, **fixed: Any) -> Any:
    """Call the command's target with every parsed flag of the same name as a parameter.

    Flags are named after the parameters they set (`dest`), so one cannot be parsed and then
    dropped: tests/test_cli_flags.py checks that every flag of every command reaches it.
    """
    target = resolve_target(args.target)
    parameters = inspect.signature(target).parameters
    given = vars(args)
    return target(**{name: given[name] for name in parameters if name in given} | fixed)


def _serve(args: argparse.Namespace) -> int:

    from app.model.config import read_config
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
    from app.service.server import run_server

    return run_server(settings)


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
    stats = call_target(args)
    print(f"teacher scores written to {args.out}: {stats}")
    return 0


def _lexical(args: argparse.Namespace) -> int:
    _quiet_loading()
    result = call_target(args)
    weights = ", ".join(f"{c} {w:g}" for c, w in result.weights.items())
    print(f"router with a lexical head saved to {result.out} ({result.model_version})")
    print(f"blend weights picked on {args.val} (0 = the router alone): {weights}")
    for category, note in result.notes.items():
        print(f"radar lexical: warning: {category}: no lexical model ({note})", file=sys.stderr)
    print(f"next: radar calibrate --model {result.out} --data {args.val} --recall 0.9 --out ...")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    _quiet_loading()
    result = call_target(args)
    print(
        f"int8 CPU router saved to {result.out} ({result.model_version}; text encoder "
        f"{result.onnx_bytes / 1e6:.1f} MB; float32: {', '.join(result.fp32)})"
    )
    print(f"next: radar calibrate --model {result.out} --data VAL.jsonl --recall 0.9 --out ...")
    return 0


def _add_training_flags(parser: argparse.ArgumentParser, *, expert: bool) -> None:
    """One flag per knob of TrainConfig; defaults are the paper's (see app/training/config)."""
    from typing import get_args

    from app.training.config import SelectMetric, TrainConfig

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
        ("early_stop_patience", int),
        ("checkpoint_every", int),
    ):
        flag(name, type=kind)
    flag("select_metric", choices=get_args(SelectMetric))
    flag("length_buckets", action=argparse.BooleanOptionalAction, default=None)
    flag("resume", type=Path)
    flag("feature_cache", type=Path, metavar="DIR")
    for name in ("gradient_checkpointing", "full_finetune", "skip_bad", "record_seen"):
        flag(name, action="store_true", default=None)
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", default=None, help="no progress bar"
    )


def _quiet_loading() -> None:
    """Only our scoring bar: transformers' per-shard loading bars are noise in a CLI."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def _evaluate(args: argparse.Namespace) -> int:
    from app.evaluation.evaluate import evaluate_model
    from app.evaluation.report import render_text, write_report
    from app.thresholds import ThresholdsError

    _quiet_loading()
    try:
        evaluation = evaluate_model(
            args.model,
            args.data,
            thresholds=args.thresholds,
            batch_size=args.batch_size,
            device=args.device,
            progress=args.progress,
            command=args.command_line,
            feature_cache=args.feature_cache,
        )
    except ThresholdsError as exc:
        print(f"radar evaluate: thresholds refused ({exc.reason}): {exc}", file=sys.stderr)
        return 2
    print(render_text(evaluation))
    # runs/ is git-ignored: a report never lands in a committed model store by default.
    out = args.out or Path("runs") / "eval" / args.model.resolve().name / args.data.stem
    written = write_report(evaluation, out)
    print(f"\nreport written to {out}/ ({len(written)} files: report.md, report.json, plots)")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from app.evaluation.calibrate import (
        DEFAULT_MIN_POSITIVES,
        CalibrationError,
        calibrate_model,
        parse_overrides,
        plan_positives,
    )
    from app.evaluation.guarantees import DEFAULT_DELTA
    from app.evaluation.report import render_calibration, render_plan
    from app.thresholds import ThresholdsError

    # Flags of one rule given with another would be silently ignored: refuse them instead.
    if args.guarantee != "quantile" and (
        args.min_positives is not None or args.allow_few_positives
    ):
        raise CalibrationError(
            "--min-positives and --allow-few-positives apply to --guarantee quantile only "
            f"(--guarantee {args.guarantee} sets its own minimum: see --plan)"
        )
    if args.guarantee != "confidence" and args.delta is not None:
        raise CalibrationError("--delta applies to --guarantee confidence only")
    delta = DEFAULT_DELTA if args.delta is None else args.delta
    min_positives = DEFAULT_MIN_POSITIVES if args.min_positives is None else args.min_positives
    per_category = parse_overrides(args.recall_per_category)
    if args.plan:  # counts only: no model weights loaded, nothing scored or written
        rows = plan_positives(
            args.model,
            args.data,
            recall=args.recall,
            per_category=per_category,
            guarantee=args.guarantee,
            delta=delta,
            min_positives=min_positives,
            only=args.only,
        )
        print(render_plan(rows, args.guarantee, delta, args.data))
        return 0
    missing = [flag for flag, value in (("--data", args.data), ("--out", args.out)) if not value]
    if missing:
        raise CalibrationError(f"{' and '.join(missing)} required (unless --plan)")
    _quiet_loading()
    try:
        result = calibrate_model(
            args.model,
            args.data,
            args.out,
            recall=args.recall,
            per_category=per_category,
            version=args.version,
            guarantee=args.guarantee,
            delta=delta,
            min_positives=min_positives,
            allow_few_positives=args.allow_few_positives,
            batch_size=args.batch_size,
            device=args.device,
            progress=args.progress,
            command=args.command_line,
            only=args.only,
            base=args.base,
            feature_cache=args.feature_cache,
        )
    except ThresholdsError as exc:
        print(f"radar calibrate: --base refused ({exc.reason}): {exc}", file=sys.stderr)
        return 2
    print(render_calibration(result))
    for c in result.categories:
        if c.note:
            print(f"radar calibrate: warning: {c.category}: {c.note}", file=sys.stderr)
    return 0


def _add_scoring_flags(parser: argparse.ArgumentParser) -> None:
    """--model, --data and how to run the router: shared by evaluate and calibrate."""
    parser.add_argument(
        "--model", type=Path, required=True, help="model-store directory (model_store/NAME)"
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="labelled JSONL (the training-data format)"
    )
    _add_router_run_flags(parser)


def _add_router_run_flags(parser: argparse.ArgumentParser) -> None:
    """How to run a trained router over a data set (`resolve_device`, then `predict`):
    shared by evaluate, calibrate and lexical."""
    parser.add_argument("--batch-size", type=int, default=32, help="posts per forward (32)")
    parser.add_argument(
        "--device", default="cpu", help="cpu, cuda or auto (CUDA when present, bf16) (cpu)"
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bar"
    )
    _add_feature_cache_flag(parser)


FEATURE_CACHE_HELP = (
    "directory of cached frozen image-encoder features (dual encoder), shared with training "
    "and teach: each image is encoded once per encoder (default: none)"
)


def _add_feature_cache_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--feature-cache", type=Path, metavar="DIR", help=FEATURE_CACHE_HELP)


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
        dest="expert_dirs",
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
        "--no-resume",
        dest="resume",
        action="store_false",
        help="start over instead of continuing a partial output",
    )
    teach.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave bad input lines out of the output (counted) instead of stopping",
    )
    teach.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bar"
    )
    _add_feature_cache_flag(teach)
    teach.set_defaults(handler=_teach, target=calls("app.training.teach", "teach"))

    lexical = commands.add_parser(
        "lexical",
        help="blend a trained router with per-category TF-IDF n-gram models",
        description="Fit one TF-IDF (word 1-2-grams + char 2-5-grams) + class-balanced "
        "logistic regression per category on TRAIN, pick per category the blend weight w "
        "(logits: (1 - w) router + w n-grams; w = 0 keeps the router alone) with the best "
        "APR@R90 on VAL, and write a model store with a new model_version. Calibrate its "
        "thresholds next with `radar calibrate`.",
    )
    lexical.add_argument(
        "--model", type=Path, required=True, help="the trained router's model-store directory"
    )
    lexical.add_argument("--train", type=Path, required=True, help="training JSONL")
    lexical.add_argument("--val", type=Path, required=True, help="validation JSONL")
    lexical.add_argument("--out", type=Path, required=True, help="model-store directory to write")
    lexical.add_argument(
        "--model-version", help="the new store's model_version (default: <router's>+lexical)"
    )
    lexical.add_argument(
        "--max-chars",
        type=int,
        default=1000,
        help="characters of each post the n-gram models read, in training and serving: "
        "their cost grows with the text (1000)",
    )
    _add_router_run_flags(lexical)
    lexical.set_defaults(handler=_lexical, target=calls("app.training.lexical", "add_lexical_head"))

    quantize = commands.add_parser(
        "quantize",
        help="write an int8 CPU router (ONNX Runtime dynamic int8) from a trained one",
        description="Merge SOURCE's LoRA (if any), export its text encoder to ONNX and quantize "
        "it with ONNX Runtime dynamic int8 (weights int8, activations per batch); write a model "
        "store with a new model_version, the MLP, heads, image encoder and lexical head "
        "unchanged in float32. Calibrate its thresholds next with `radar calibrate`.",
    )
    quantize.add_argument("source", type=Path, metavar="SOURCE", help="the float32 model store")
    quantize.add_argument("--out", type=Path, required=True, help="model-store directory to write")
    quantize.add_argument(
        "--model-version", help="the new store's model_version (default: <source's>+int8)"
    )
    quantize.add_argument(
        "--per-tensor",
        dest="per_channel",
        action="store_false",
        help="one weight scale per matrix instead of one per output channel",
    )
    quantize.add_argument(
        "--fp32-embeddings",
        action="store_true",
        help="keep the embedding tables float32 (a bigger file; lookups gain nothing from int8)",
    )
    quantize.set_defaults(handler=_quantize, target=calls("app.model.quantize", "quantize_router"))

    evaluate = commands.add_parser(
        "evaluate",
        help="PR-AUC, R@P60, APR@R90/95 per category on a labelled JSONL; plots",
        description="Score DATA with the router and report, per category on its own annotated "
        "samples, PR-AUC (average precision), R@P60, APR@R90 and APR@R95 beside the random "
        "floor (1 - R) and the oracle ceiling; prints a table and writes report.md, "
        "report.json and PR / APR-vs-recall PNGs. With --thresholds, also the recall (95%% "
        "bootstrap interval) and auto-pass rates those taus realise on DATA.",
    )
    _add_scoring_flags(evaluate)
    evaluate.add_argument(
        "--out",
        type=Path,
        help="report directory (default: runs/eval/<model dir name>/<data file stem>)",
    )
    evaluate.add_argument(
        "--thresholds", type=Path, help="thresholds YAML to check on DATA (must fit the model)"
    )
    evaluate.set_defaults(handler=_evaluate)

    calibrate = commands.add_parser(
        "calibrate",
        help="write a thresholds YAML whose recall target holds on new posts",
        description="Score DATA (a validation split) with the router and pick, per category, "
        "the highest tau that keeps its recall target under --guarantee: 'confidence' "
        "(default; Learn-then-Test / Clopper-Pearson: recall >= R with probability >= "
        "1 - delta), 'expected' (conformal risk control: expected recall >= R) or 'quantile' "
        "(recall >= R on DATA only, no guarantee on new posts: with few positives it falls "
        "short about half the time). A category with too few positives for its guarantee "
        "gets tau 0 (dispatch everything) and a note saying how many it needs; --plan prints "
        "those numbers first. Writes the thresholds file the service reads (atomically), "
        "with provenance.",
    )
    _add_scoring_flags(calibrate)
    for action in calibrate._actions:  # --plan needs no data (it then counts its labels)
        if action.dest == "data":
            action.required = False
            action.help = f"{action.help}; required unless --plan"
    calibrate.add_argument(
        "--recall", type=float, required=True, help="recall target of every category, e.g. 0.9"
    )
    calibrate.add_argument(
        "--recall-per-category",
        nargs="+",
        action="extend",
        default=[],
        metavar="CATEGORY=R",
        help="override the target of some categories, e.g. fe=0.95",
    )
    calibrate.add_argument(
        "--out",
        type=Path,
        help="thresholds YAML to write (thresholds/NAME.yaml); not needed with --plan",
    )
    calibrate.add_argument(
        "--version", help="the file's version string (default: <model_version>@<UTC time>)"
    )
    calibrate.add_argument(
        "--guarantee",
        # app.evaluation.guarantees.GUARANTEES (a test keeps them equal); not imported here:
        # it loads scipy, and every `radar` command builds this parser.
        choices=("confidence", "expected", "quantile"),
        default="confidence",
        help="confidence: recall >= R with probability >= 1 - delta (needs 29 positives for "
        "R = 0.90 at delta 0.05); expected: expected recall >= R (9 for R = 0.90); "
        "quantile: recall >= R on DATA, no guarantee (default: confidence)",
    )
    calibrate.add_argument(
        "--delta",
        type=float,
        help="confidence only: allowed probability that a category's recall is below R "
        "(default: 0.05)",
    )
    calibrate.add_argument(
        "--plan",
        action="store_true",
        help="print the positives each category needs for its target under the guarantee "
        "(and, with --data, how many it has), then exit without scoring",
    )
    calibrate.add_argument(
        "--only",
        nargs="+",
        metavar="CATEGORY",
        help="recalibrate just these categories; the others' entries are copied from --base",
    )
    calibrate.add_argument(
        "--base",
        type=Path,
        help="with --only: the thresholds file (valid for the model) to copy the others from",
    )
    calibrate.add_argument(
        "--min-positives",
        type=int,
        help="quantile only: refuse a category with fewer positives (also needs >= 1/(1-R)) "
        "(default: 20)",
    )
    calibrate.add_argument(
        "--allow-few-positives",
        action="store_true",
        help="quantile only: write thresholds even for categories with too few positives "
        "(noted in the file)",
    )
    calibrate.set_defaults(handler=_calibrate)

    add_operations_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        # Before anything loads torch: it sets the OpenMP wait policy the server wants.
        import app.service.server  # noqa: F401
    # Provenance for reports and thresholds files: the command as typed.
    args.command_line = shlex.join(["radar", *(sys.argv[1:] if argv is None else argv)])
    handler: Handler = args.handler
    try:
        return handler(args)
    except BrokenPipeError:
        # The reader went away (`radar quality ... | head -4`): nobody is left to read the
        # rest, which is not an error of ours. Point stdout at /dev/null so the interpreter's
        # final flush cannot raise again (the recipe in Python's `signal` documentation).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by it
    except Exception as exc:
        if not isinstance(exc, _usage_errors()):
            raise
        print(f"radar {args.command}: {exc}", file=sys.stderr)
        return 2


def _usage_errors() -> tuple[type[Exception], ...]:
    """Errors that mean unusable input (exit 2, one line, no traceback). The training ones
    only when a command loaded their modules: importing those for every command would load
    torch (seconds) for `radar thresholds` too."""
    errors: list[type[Exception]] = [ModelStoreError, ValueError]
    for module, name in (("app.data.records", "DataError"), ("app.training.teach", "TeachError")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


if __name__ == "__main__":
    sys.exit(main())
