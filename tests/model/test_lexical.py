"""The lexical head: the baseline's scikit-learn model, stored without pickle, blended exactly."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import FeatureUnion, Pipeline

from app.model.errors import ModelStoreError
from app.model.lexical import (
    LEXICAL_CONFIG,
    LEXICAL_WEIGHTS,
    LexicalHead,
)
from app.model.post import Post
from app.model.store import load_router, save_router
from app.training.lexical import fit_lexical_model

CATEGORIES = ("lqc", "rcs", "fe")
WORDS = ("cat", "sofa", "free", "cruise", "call", "now", "sunny", "walk", "prize", "claim")


def texts_and_labels(n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(n):
        positive = int(rng.random() < 0.4)
        words = list(rng.choice(WORDS, size=6))
        if positive:
            words += ["win", "cruise", "claim"]
        texts.append(" ".join(words))
        labels.append(positive)
    return texts, np.array(labels)


def baseline_pipeline() -> Pipeline:
    """experiments/proxy/baselines.py's model, written out independently."""
    features = FeatureUnion(
        [
            (
                "word",
                TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, min_df=2),
            ),
            (
                "char",
                TfidfVectorizer(
                    analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2
                ),
            ),
        ]
    )
    classifier = LogisticRegression(class_weight="balanced", max_iter=2000)
    return Pipeline([("features", features), ("classifier", classifier)])


def test_the_lexical_model_is_the_baseline_pipeline() -> None:
    texts, labels = texts_and_labels(120)
    held_out, _ = texts_and_labels(40, seed=1)
    model = fit_lexical_model(texts, labels)
    expected = baseline_pipeline().fit(texts, labels).predict_proba(held_out)[:, 1]
    got = 1 / (1 + np.exp(-model.decision(held_out)))
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


def head_on(tiny_store: Path, tmp_path: Path, weights: dict[str, float]) -> tuple[Path, Path]:
    """The tiny router saved again with a lexical head (models for lqc and fe)."""
    texts, labels = texts_and_labels(120)
    models = {"lqc": fit_lexical_model(texts, labels), "fe": fit_lexical_model(texts, 1 - labels)}
    router = load_router(tiny_store)
    router.lexical = LexicalHead(CATEGORIES, models, weights)
    router.config = router.config.model_copy(
        update={"lexical_head": True, "model_version": "tiny+lexical"}
    )
    blended = tmp_path / "blended"
    shutil.copytree(tiny_store, blended)
    save_router(router, blended)
    return tiny_store, blended


def posts() -> list[Post]:
    held_out, _ = texts_and_labels(7, seed=3)
    return [Post(title=text) for text in held_out]


def test_a_saved_head_loads_and_blends_the_logits_exactly(tiny_store: Path, tmp_path: Path) -> None:
    weights = {"lqc": 0.3, "rcs": 0.0, "fe": 1.0}
    plain_dir, blended_dir = head_on(tiny_store, tmp_path, weights)
    plain, blended = load_router(plain_dir), load_router(blended_dir)
    assert blended.config.model_version == "tiny+lexical"
    assert blended.lexical is not None and plain.lexical is None
    batch = posts()
    with torch.inference_mode():
        router_logits = plain.forward(plain.build_inputs(batch)).double().numpy()
    lexical = blended.lexical.logits([p.text() for p in batch])
    expected = 1 / (
        1
        + np.exp(
            -((1 - np.array([0.3, 0.0, 1.0])) * router_logits + np.array([0.3, 0.0, 1.0]) * lexical)
        )
    )
    got = blended.predict_proba(batch).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # w = 0 is the router alone, w = 1 the n-gram model alone.
    np.testing.assert_allclose(got[:, 1], plain.predict_proba(batch).numpy()[:, 1], atol=1e-6)
    assert not np.allclose(got[:, 2], plain.predict_proba(batch).numpy()[:, 2], atol=1e-3)


def test_the_store_files_hold_no_pickle_and_name_the_weights(
    tiny_store: Path, tmp_path: Path
) -> None:
    _, blended = head_on(tiny_store, tmp_path, {"lqc": 0.5, "rcs": 0.0, "fe": 0.25})
    config = json.loads((blended / LEXICAL_CONFIG).read_text())
    assert config["weights"] == {"lqc": 0.5, "rcs": 0.0, "fe": 0.25}
    assert set(config["models"]) == {"lqc", "fe"}
    assert json.loads((blended / "router.json").read_text())["lexical_head"] is True
    assert set(load_file(str(blended / LEXICAL_WEIGHTS))) == {
        f"{c}.{part}"
        for c in ("lqc", "fe")
        for part in ("word.idf", "char.idf", "coef", "intercept")
    }


@pytest.mark.parametrize("damage", ["missing_weights", "short_coef", "other_analyzer", "bad_json"])
def test_a_broken_head_is_a_model_store_error_naming_the_file(
    tiny_store: Path, tmp_path: Path, damage: str
) -> None:
    _, blended = head_on(tiny_store, tmp_path, {"lqc": 0.5, "rcs": 0.0, "fe": 0.25})
    if damage == "missing_weights":
        (blended / LEXICAL_WEIGHTS).unlink()
    elif damage == "short_coef":
        tensors = load_file(str(blended / LEXICAL_WEIGHTS))
        tensors["lqc.coef"] = tensors["lqc.coef"][:-1].copy()
        save_file(tensors, str(blended / LEXICAL_WEIGHTS))
    elif damage == "other_analyzer":
        config = json.loads((blended / LEXICAL_CONFIG).read_text())
        config["analyzers"]["char"]["ngram_range"] = [1, 3]
        (blended / LEXICAL_CONFIG).write_text(json.dumps(config))
    else:
        (blended / LEXICAL_CONFIG).write_text("{not json")
    with pytest.raises(ModelStoreError) as error:
        load_router(blended)
    assert "lexical" in str(error.value)


def test_weights_are_checked() -> None:
    texts, labels = texts_and_labels(60)
    model = fit_lexical_model(texts, labels)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        LexicalHead(CATEGORIES, {"lqc": model}, {"lqc": 1.5})
    with pytest.raises(ValueError, match="no lexical model"):
        LexicalHead(CATEGORIES, {"lqc": model}, {"rcs": 0.5})
    with pytest.raises(ValueError, match="lacks"):
        LexicalHead(CATEGORIES, {"spam": model}, {"spam": 0.5})


def test_the_head_reads_only_the_first_max_chars_of_a_text(
    tiny_store: Path, tmp_path: Path
) -> None:
    texts, labels = texts_and_labels(60)
    model = fit_lexical_model(texts, labels)
    head = LexicalHead(CATEGORIES, {"lqc": model}, {"lqc": 1.0}, max_chars=40)
    long = "my cat on the sofa, sunny walk " + "win cruise claim " * 500
    assert head.logits([long])[0, 0] == head.logits([long[:40]])[0, 0]
    assert (
        head.logits([long])[0, 0]
        != LexicalHead(CATEGORIES, {"lqc": model}, {"lqc": 1.0}).logits([long])[0, 0]
    )
    router = load_router(tiny_store)
    router.lexical = head
    router.config = router.config.model_copy(update={"lexical_head": True})
    save_router(router, tmp_path / "store")
    assert json.loads((tmp_path / "store" / LEXICAL_CONFIG).read_text())["max_chars"] == 40
