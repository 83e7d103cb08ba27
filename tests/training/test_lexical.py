"""`radar lexical`: fit the n-gram models, pick each category's blend on validation, write a
store that loads, calibrates and serves with its own model_version."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from app.cli import main
from app.model.config import read_config
from app.model.post import Post
from app.model.store import load_router
from app.service.engine import RouterEngine
from app.thresholds import load_thresholds
from app.training.lexical import WEIGHT_GRID, choose_weights

CATEGORIES = ("lqc", "rcs", "fe")


def test_the_weight_follows_whichever_score_ranks_the_validation_posts() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=(400, 2))
    noise = rng.normal(size=(400, 2))
    # Overlapping classes: any share of noise blended in costs ranking.
    informative = 2.0 * (labels - 0.5) + rng.normal(size=(400, 2))
    # Category a: the router ranks, the n-grams are noise; category b: the reverse.
    router = np.column_stack([informative[:, 0], noise[:, 1]])
    lexical = np.column_stack([noise[:, 0], informative[:, 1]])
    weights = choose_weights(labels, router, lexical, ("a", "b"), ["a", "b"])
    assert weights["a"] <= 0.2 and weights["b"] >= 0.8
    assert set(weights.values()) <= set(WEIGHT_GRID)


def test_a_category_without_a_model_or_without_positives_keeps_the_router() -> None:
    rng = np.random.default_rng(1)
    labels = np.column_stack([rng.integers(0, 2, 200), np.zeros(200, dtype=int)])
    scores = rng.normal(size=(200, 2))
    assert choose_weights(labels, scores, scores, ("a", "b"), ["b"]) == {"a": 0.0, "b": 0.0}


def write_split(directory: Path, name: str, n: int, seed: int) -> Path:
    """Each post labelled for every category; lqc positives say 'blurry', fe's 'fraud'."""
    rng = np.random.default_rng(seed)
    words = ["cat", "sofa", "sunny", "walk", "lunch", "park", "river", "book"]
    path = directory / f"{name}.jsonl"
    with path.open("w") as file:
        for i in range(n):
            lqc, fe = int(rng.random() < 0.4), int(rng.random() < 0.4)
            text = list(rng.choice(words, size=5))
            text += ["blurry", "photo"] if lqc else []
            text += ["fraud", "wire", "money"] if fe else []
            rng.shuffle(text)
            labels = {"lqc": lqc, "rcs": int(rng.random() < 0.3), "fe": fe}
            record = {"post_id": f"{name}-{i}", "title": " ".join(text), "labels": labels}
            file.write(json.dumps(record) + "\n")
    return path


def test_radar_lexical_writes_a_store_that_calibrates_and_routes(
    tiny_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = write_split(tmp_path, "train", 160, seed=0)
    val = write_split(tmp_path, "val", 120, seed=1)
    out = tmp_path / "blended"
    args = ["lexical", "--model", str(tiny_store), "--train", str(train), "--val", str(val)]
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"saved to {out}" in printed and "radar calibrate --model" in printed

    config = read_config(out)
    assert config.lexical_head and config.model_version == "tiny-qwen3vl-1+lexical"
    weights = json.loads((out / "lexical.json").read_text())["weights"]
    # The random tiny router ranks nothing and the words rank lqc and fe perfectly: some
    # share of the n-grams is picked (the smallest that ranks perfectly wins the tie).
    assert weights["lqc"] > 0 and weights["fe"] > 0

    thresholds = tmp_path / "blended.yaml"
    calibrate = ["calibrate", "--model", str(out), "--data", str(val), "--recall", "0.9"]
    assert main([*calibrate, "--out", str(thresholds), "--no-progress"]) == 0
    written = yaml.safe_load(thresholds.read_text())
    assert written["model_version"] == config.model_version

    active = load_thresholds(thresholds, config.categories, config.model_version)
    engine = RouterEngine(load_router(out))
    fraud, calm = engine.route(
        [Post(title="wire the money now, fraud"), Post(title="my cat on the sofa")], active
    )
    assert fraud.scores["fe"] > calm.scores["fe"]
    assert "fe" in fraud.dispatch and "fe" not in calm.dispatch


def test_a_store_that_has_a_head_already_is_refused(
    tiny_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = write_split(tmp_path, "train", 80, seed=0)
    out = tmp_path / "blended"
    common = ["--train", str(train), "--val", str(train), "--no-progress"]
    assert main(["lexical", "--model", str(tiny_store), "--out", str(out), *common]) == 0
    again = tmp_path / "twice"
    assert main(["lexical", "--model", str(out), "--out", str(again), *common]) == 2
    assert "already has a lexical head" in capsys.readouterr().err
    assert not again.exists()
