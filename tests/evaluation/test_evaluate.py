"""`radar evaluate` on the tiny random router: files written, numbers equal to the metrics
module on the same scores, undefined metrics shown as n/a, a thresholds file checked."""

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from app.cli import main
from app.evaluation.evaluate import (
    ModelEvaluation,
    ScoredData,
    evaluate_scored,
    json_safe,
    score_data,
)
from app.evaluation.metrics import bootstrap_recall_ci, evaluate_scores, overall_auto_pass_rate
from app.evaluation.report import render_text, write_report
from app.model.post import Post
from app.model.store import load_router
from app.thresholds import ThresholdsError

CATEGORIES = ("lqc", "rcs", "fe")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
Labeller = Callable[[int], dict[str, int]]


def disjoint(i: int) -> dict[str, int]:
    """Post i is annotated for one category only (the paper's disjoint pipelines)."""
    return {CATEGORIES[i % 3]: (i // 3) % 2}


def write_posts(path: Path, n: int, labeller: Labeller = disjoint) -> Path:
    """`n` posts of varied text (so scores differ), an image on every 7th, labels by `labeller`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (200, 20, 20)).save(path.parent / "red.png")
    words = ["cheap", "pills", "cat", "video", "free", "money", "garden", "news"]
    with path.open("w") as file:
        for i in range(n):
            record = {
                "post_id": f"p{i}",
                "title": " ".join(words[(i * k) % len(words)] for k in range(1, 4)) + f" {i}",
                "ocr_text": "dm me" if i % 4 == 0 else "",
                "images": ["red.png"] if i % 7 == 0 else [],
                "labels": labeller(i),
            }
            file.write(json.dumps(record) + "\n")
    return path


def no_fe_positive(i: int) -> dict[str, int]:
    """lqc/rcs as `disjoint`; fe annotated but never positive; one foreign category."""
    labels = disjoint(i)
    if "fe" in labels:
        labels["fe"] = 0
    if i % 10 == 0:
        labels["spam"] = 1  # a category the model does not have: ignored, and reported
    return labels


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_posts(tmp_path_factory.mktemp("eval") / "test.jsonl", 48, no_fe_positive)


@pytest.fixture(scope="module")
def scored(tiny_store: Path, data: Path) -> ScoredData:
    return score_data(tiny_store, data, batch_size=16)


def test_scores_are_the_routers_in_data_order(tiny_store: Path, scored: ScoredData) -> None:
    router = load_router(tiny_store)
    lines = [json.loads(line) for line in scored.data.read_text().splitlines()]
    posts = [Post(title=r["title"], ocr_text=r["ocr_text"], images=()) for r in lines]
    no_image = [i for i, r in enumerate(lines) if not r["images"]]
    direct = router.predict_proba([posts[i] for i in no_image]).numpy()
    assert scored.post_ids == tuple(r["post_id"] for r in lines)
    assert scored.categories == CATEGORIES
    # Batching changes padding only: equal up to float32 noise.
    np.testing.assert_allclose(scored.scores[no_image], direct, atol=1e-5)
    assert scored.labels[0].tolist() == [0, -1, -1] and scored.labels[2].tolist() == [-1, -1, 0]
    assert scored.ignored_categories == ("spam",)
    assert scored.data_fingerprint.startswith("sha256:")


def test_report_numbers_equal_the_metrics_module(scored: ScoredData, tmp_path: Path) -> None:
    evaluation = evaluate_scored(scored, command="radar evaluate (test)")
    written = write_report(evaluation, tmp_path / "report")
    document = json.loads((tmp_path / "report" / "report.json").read_text())
    expected = json_safe(evaluate_scores(scored.labels, scored.scores, CATEGORIES).to_dict())
    assert document["metrics"] == expected
    assert document["model_version"] == "tiny-qwen3vl-1"
    assert document["data_fingerprint"] == scored.data_fingerprint
    assert document["command"] == "radar evaluate (test)"
    assert document["date"].endswith("Z") and document["n_posts"] == 48
    assert document["ignored_categories"] == ["spam"]
    fe = document["metrics"]["categories"]["fe"]
    assert fe["pr_auc"] is None and fe["undefined_reason"] == "no positive samples"
    assert document["metrics"]["n_defined"] == 2
    for name in ("lqc", "rcs"):
        m = document["metrics"]["categories"][name]
        # A perfect ranker dispatches the ⌈0.9·P⌉ top positives and passes everything else.
        expected_oracle = (m["n_annotated"] - math.ceil(0.9 * m["n_positive"])) / m["n_annotated"]
        assert document["oracle"][name]["apr_r90"] == pytest.approx(expected_oracle)
        assert m["apr_r90"] <= document["oracle"][name]["apr_r90"]
    assert document["oracle"]["fe"]["apr_r90"] is None
    mean = np.mean([document["oracle"][c]["apr_r95"] for c in ("lqc", "rcs")])
    assert document["oracle_average"]["apr_r95"] == pytest.approx(mean)
    names = sorted(p.name for p in written)
    assert names == sorted(
        ["report.md", "report.json", "pr_lqc.png", "apr_lqc.png", "pr_rcs.png", "apr_rcs.png"]
    )
    for png in (p for p in written if p.suffix == ".png"):
        assert png.read_bytes()[:8] == PNG_MAGIC
        with Image.open(png) as image:
            image.verify()
            assert image.format == "PNG" and image.size == (500, 400)
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| fe | 16 | 0 | n/a | n/a | n/a | n/a |" in markdown
    assert "![pr_lqc](pr_lqc.png)" in markdown


def test_undefined_metrics_print_as_na(scored: ScoredData) -> None:
    text = render_text(evaluate_scored(scored, command="-"))
    fe_row = next(line for line in text.splitlines() if line.startswith("fe "))
    assert fe_row.split()[3:7] == ["n/a"] * 4
    assert "fe: n/a (no positive samples)" in text
    assert "ignored: spam" in text
    assert "average (2 of 3)" in text


def test_a_category_without_annotations_is_na_not_a_crash(tiny_store: Path, tmp_path) -> None:
    data = write_posts(tmp_path / "d.jsonl", 12, lambda i: {"lqc": i % 2})
    evaluation = evaluate_scored(score_data(tiny_store, data), {"lqc": 0.5, "rcs": 0.5, "fe": 0.5})
    assert evaluation.metrics.categories["rcs"].undefined_reason == "no annotated samples"
    rcs = evaluation.thresholds.categories["rcs"]
    assert math.isnan(rcs.recall) and math.isnan(rcs.auto_pass_rate)
    assert "rcs: n/a (no annotated samples)" in render_text(evaluation)
    json.dumps(evaluation.to_dict(), allow_nan=False)  # strict JSON: no NaN, no inf


def write_thresholds(path: Path, taus: dict[str, float], model_version: str) -> Path:
    document = {
        "version": "t1",
        "model_version": model_version,
        "categories": {name: {"tau": tau} for name, tau in taus.items()},
    }
    path.write_text(yaml.safe_dump(document))
    return path


def test_thresholds_check_realised_recall_and_auto_pass(scored: ScoredData, tmp_path) -> None:
    taus = {name: float(np.median(scored.scores[:, k])) for k, name in enumerate(CATEGORIES)}
    path = write_thresholds(tmp_path / "t.yaml", taus, scored.model_version)
    evaluation: ModelEvaluation = evaluate_scored(scored, path, n_boot=200)
    check = evaluation.thresholds
    assert check is not None and check.version == "t1"
    for k, name in enumerate(CATEGORIES):
        y, s = scored.labels[:, k], scored.scores[:, k]
        row = check.categories[name]
        assert row.tau == taus[name]
        assert row.auto_pass_rate == pytest.approx(np.mean(s[y != -1] <= taus[name]))
        assert row.pass_share_all == pytest.approx(np.mean(s <= taus[name]))
        if name == "fe":
            assert math.isnan(row.recall)  # no positive: undefined, not 0
            continue
        ci = bootstrap_recall_ci(y, s, taus[name], n_boot=200)
        assert (row.recall, row.recall_low, row.recall_high) == tuple(ci)
        assert row.recall_low <= row.recall <= row.recall_high
    expected = overall_auto_pass_rate(scored.scores, [taus[c] for c in CATEGORIES])
    assert check.overall_auto_pass_rate == expected
    text = render_text(evaluation)
    assert "overall auto-pass rate (posts dispatched to no category)" in text


def test_a_thresholds_file_for_another_model_is_refused(scored: ScoredData, tmp_path) -> None:
    path = write_thresholds(tmp_path / "t.yaml", dict.fromkeys(CATEGORIES, 0.5), "other-model")
    with pytest.raises(ThresholdsError) as info:
        evaluate_scored(scored, path)
    assert info.value.reason == "model_version"


def test_cli_prints_the_table_and_writes_the_report(
    tiny_store: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    taus = dict.fromkeys(CATEGORIES, 0.5)
    thresholds = write_thresholds(tmp_path / "t.yaml", taus, "tiny-qwen3vl-1")
    out = tmp_path / "out"
    argv = ["evaluate", "--model", str(tiny_store), "--data", str(data), "--out", str(out)]
    rc = main([*argv, "--thresholds", str(thresholds), "--no-progress", "--batch-size", "8"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "PR-AUC" in printed and "APR@R95" in printed and "oracle" in printed
    assert "thresholds t1" in printed and "recall [95% CI]" in printed
    document = json.loads((out / "report.json").read_text())
    assert document["command"].startswith("radar evaluate --model")
    assert document["thresholds"]["version"] == "t1"
    assert (out / "apr_rcs.png").read_bytes()[:8] == PNG_MAGIC


def test_cli_names_a_refused_thresholds_file(
    tiny_store: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: [")
    argv = ["evaluate", "--model", str(tiny_store), "--data", str(data), "--thresholds", str(bad)]
    assert main([*argv, "--no-progress", "--out", str(tmp_path / "o")]) == 2
    assert "thresholds refused (yaml)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
