"""The README's training pipeline through the `radar` command, on the tiny router:
train-expert per category → teach → train --lambda 0.5, and the result loads."""

import json

from app.cli import main
from app.model.store import load_router
from tests.training.test_trainer import CATEGORIES, write_dataset


def test_expert_teach_train_pipeline(tiny_store, tmp_path, capsys) -> None:
    data = write_dataset(tmp_path / "data", "train", 24)
    common = [
        "--model-config",
        str(tiny_store),
        "--batch-size",
        "6",
        "--max-steps",
        "2",
        "--no-progress",
        "--head-lr",
        "1e-2",
    ]
    experts = []
    for category in CATEGORIES:
        out = tmp_path / f"expert-{category}"
        assert (
            main(
                [
                    "train-expert",
                    "--category",
                    category,
                    "--data",
                    str(data),
                    "--out",
                    str(out),
                    *common,
                ]
            )
            == 0
        )
        experts.append(str(out))
    taught = tmp_path / "train.teach.jsonl"
    assert (
        main(
            [
                "teach",
                "--experts",
                *experts,
                "--data",
                str(data),
                "--out",
                str(taught),
                "--no-progress",
            ]
        )
        == 0
    )
    lines = [json.loads(line) for line in taught.read_text().splitlines()]
    assert all(set(line["teacher"]) == set(CATEGORIES) for line in lines)
    original = [json.loads(line) for line in data.read_text().splitlines()]
    assert [line["labels"] for line in lines] == [line["labels"] for line in original]
    router_dir = tmp_path / "router"
    assert (
        main(["train", "--data", str(taught), "--out", str(router_dir), "--lambda", "0.5", *common])
        == 0
    )
    log = [json.loads(x) for x in (router_dir / "train_log.jsonl").read_text().splitlines()]
    assert any(e["event"] == "train" and e["distill"] > 0 for e in log)
    assert load_router(router_dir).categories == CATEGORIES
    assert "router saved to" in capsys.readouterr().out


def test_bad_data_line_is_a_clear_error_not_a_traceback(tiny_store, tmp_path, capsys) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"post_id": "a", "labels": {"lqc": 2}}\n')
    code = main(
        [
            "train",
            "--data",
            str(data),
            "--model-config",
            str(tiny_store),
            "--out",
            str(tmp_path / "o"),
            "--lambda",
            "0",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "bad.jsonl:1" in err and "labels" in err


def test_selection_bucket_and_finetune_flags_reach_the_config() -> None:
    from app.cli import _train_config, build_parser

    base = ["--data", "d.jsonl", "--model-config", "m", "--out", "o"]
    default = _train_config(build_parser().parse_args(["train", *base]))
    assert default.length_buckets and not default.full_finetune
    assert (default.select_metric, default.early_stop_patience) == ("pr_auc", None)
    flags = ["--no-length-buckets", "--full-finetune", "--select-metric", "apr_r90"]
    flags += ["--early-stop-patience", "2", "--val", "v.jsonl"]
    for command in (["train"], ["train-expert", "--category", "lqc"]):
        cfg = _train_config(build_parser().parse_args([*command, *base, *flags]))
        assert not cfg.length_buckets and cfg.full_finetune
        assert (cfg.select_metric, cfg.early_stop_patience) == ("apr_r90", 2)
