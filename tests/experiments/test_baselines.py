"""experiments.proxy.baselines on a small JSONL written here: per-category training, the text
the router reads, the scores matrix, and the CLI's outputs (with a tiny router)."""

import json
from pathlib import Path

import numpy as np
import pytest

from app.data.records import load_records
from app.model.tiny import make_tiny_router
from app.training.lexical import record_text
from experiments.proxy.baselines import (
    TFIDF,
    ScoreMatrix,
    compare,
    main,
    tfidf_scores,
    train_tfidf,
)

CATEGORIES = ("spam", "hate", "empty")
SPAM = ("win a free cruise call now", "claim your free prize now", "free money click now")
HAM = ("my cat sleeps on the sofa", "lunch with my sister today", "the train was late again")
HATE = ("those people are vermin", "i hate those people so much", "vermin people go away")
KIND = ("those people are lovely", "i like those people so much", "kind people stay here")


def write(path: Path, rows: list[tuple[str, dict[str, int]]]) -> Path:
    """A JSONL in the proxy layout; every label the row does not give is -1."""
    with path.open("w", encoding="utf-8") as handle:
        for index, (title, labels) in enumerate(rows):
            record = {
                "post_id": f"{path.stem}:{index}",
                "title": title,
                "ocr_text": "",
                "images": [],
                "labels": {c: labels.get(c, -1) for c in CATEGORIES},
            }
            handle.write(json.dumps(record) + "\n")
    return path


def posts(repeat: int) -> list[tuple[str, dict[str, int]]]:
    """Spam posts annotated for spam only, hate posts for hate only (disjoint pipelines)."""
    rows: list[tuple[str, dict[str, int]]] = []
    for r in range(repeat):
        rows += [(f"{t} {r}", {"spam": 1}) for t in SPAM] + [(f"{t} {r}", {"spam": 0}) for t in HAM]
        rows += [(f"{t} {r}", {"hate": 1}) for t in HATE] + [
            (f"{t} {r}", {"hate": 0}) for t in KIND
        ]
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("baselines")
    write(folder / "train.jsonl", posts(4))
    write(folder / "test.jsonl", posts(2))
    return folder


def test_each_category_trains_on_its_own_annotated_posts(data: Path) -> None:
    records = load_records(data / "train.jsonl", CATEGORIES).records
    baseline = train_tfidf(records, CATEGORIES)
    assert set(baseline.models) == {"spam", "hate"}
    # Only annotated posts: the spam model saw 24 posts, none of the hate pipeline's.
    assert baseline.models["spam"].coef.size > 0
    vocabulary = baseline.models["spam"].vectorizers["word"]
    assert "vermin" not in vocabulary.vocabulary_ and "free" in vocabulary.vocabulary_
    assert baseline.constant == {"empty": 0.0}
    assert "empty" in baseline.notes


def test_scores_every_test_post_for_every_category(data: Path) -> None:
    matrix, _ = tfidf_scores(data / "train.jsonl", data / "test.jsonl", CATEGORIES)
    assert matrix.scores.shape == (24, 3) and matrix.labels.shape == (24, 3)
    assert np.isfinite(matrix.scores).all()
    report = matrix.report()
    assert report.categories["spam"].pr_auc == pytest.approx(1.0)
    assert report.categories["hate"].pr_auc > 0.9
    assert not report.categories["empty"].defined


def test_text_is_what_the_router_reads(tmp_path: Path) -> None:
    path = tmp_path / "one.jsonl"
    record = {"post_id": "x", "title": "fr\u0435e\u200b prize", "ocr_text": "call", "labels": {}}
    path.write_text(json.dumps(record) + "\n")
    item = load_records(path, CATEGORIES).records[0]
    from app.model.post import Post

    assert record_text(item) == Post(title=record["title"], ocr_text="call").text()
    assert record_text(item).startswith("Title: ") and "OCR: call" in record_text(item)


def test_compare_aligns_categories_by_name_and_checks_posts(data: Path) -> None:
    matrix, _ = tfidf_scores(data / "train.jsonl", data / "test.jsonl", CATEGORIES)
    flipped = ScoreMatrix(
        "flipped",
        ("hate", "spam"),
        matrix.post_ids,
        matrix.labels[:, [1, 0]],
        1.0 - matrix.scores[:, [1, 0]],
    )
    result = compare(matrix, flipped, n_boot=50)
    assert {d.category for d in result.differences} == {"spam", "hate", "average"}
    assert result.get("spam", "pr_auc").verdict == "holds"
    other = ScoreMatrix(
        "other", matrix.categories, matrix.post_ids[::-1], matrix.labels, matrix.scores
    )
    with pytest.raises(ValueError, match="different posts"):
        compare(matrix, other)


def test_cli_writes_tables_and_json_with_a_router(data: Path, tmp_path: Path, capsys) -> None:
    router = make_tiny_router(tmp_path / "router", categories=("spam", "hate"))
    out = tmp_path / "out"
    main(["--data", str(data), "--router", str(router), "--out", str(out), "--n-boot", "50"])
    printed = capsys.readouterr().out
    assert "| spam |" in printed and "router − TF-IDF + LR" in printed
    assert "**average**" in printed
    document = json.loads((out / "baselines.json").read_text())
    assert set(document["systems"]) == {"router", TFIDF}
    assert document["categories"] == ["spam", "hate"]
    assert document["bootstrap"]["n_boot"] == 50
    assert document["oracle"]["spam"]["apr_r90"] is not None
    saved = np.load(out / "scores.npz")
    assert saved["router"].shape == saved["tfidf"].shape == (24, 2)


def test_orderings_run_only_for_rows_present(data: Path) -> None:
    from experiments.proxy.results import ORDERINGS, ordering_bootstraps

    matrix, _ = tfidf_scores(data / "train.jsonl", data / "test.jsonl", ("spam", "hate"))
    router = ScoreMatrix("λ=0.5", matrix.categories, matrix.post_ids, matrix.labels, matrix.scores)
    results = ordering_bootstraps({TFIDF: matrix, "λ=0.5": router}, n_boot=20)
    assert list(results) == [
        claim for claim, low, high in ORDERINGS if low == TFIDF and high == "λ=0.5"
    ]
    result = next(iter(results.values()))
    assert (result.a, result.b) == ("λ=0.5", TFIDF)
    assert all(d.verdict == "not shown" for d in result.differences)  # the same scores
