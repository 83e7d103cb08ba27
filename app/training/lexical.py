"""Give a trained router a lexical head: fit the n-gram models, pick the blend on validation.

    radar lexical --model model_store/router --train train.jsonl --val val.jsonl --out DST

1. One TF-IDF + class-balanced logistic regression per category, on that category's own
   annotated training posts (the baseline of experiments/proxy/baselines.py, the same code).
2. The router's logits and the n-gram logits of every validation post.
3. Per category, the blend weight w on a grid of 0, 0.05, …, 1 with the best validation
   APR@R90 (the traffic released at the recall the thresholds are calibrated for), ties
   broken by PR-AUC, then by the smaller w (the router alone when nothing is gained).
4. A model store at DST: the router's files, `lexical.json` / `lexical.safetensors`, and a
   new `model_version`, so that no thresholds file calibrated for the router alone binds to
   it. Calibrate it next (`radar calibrate --model DST`).

Where the weights are picked matters for the thresholds' guarantee, which assumes a scoring
function fixed before the calibration posts are seen. Picking one w per category from 21 on
the validation split bends that, as picking λ and the best checkpoint on it already does; the
test split, which none of the three choices sees, is where the realised recall is checked
(docs/results.md). A user with a larger validation split can hold a part of it out for
`radar calibrate`.
"""

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse
from sklearn.linear_model import LogisticRegression

from app.data.records import LoadedRecord, PostDataset, label_matrix, load_records
from app.data.scoring import predict
from app.evaluation.evaluate import resolve_device
from app.evaluation.metrics import evaluate_scores
from app.model.config import read_config
from app.model.lexical import ANALYZERS, LexicalHead, LexicalModel, new_vectorizer, truncate
from app.model.post import Post
from app.model.store import copy_router, load_router, write_config

log = logging.getLogger(__name__)

WEIGHT_GRID = tuple(round(0.05 * i, 2) for i in range(21))
# What a served lexical head reads of a post (app/model/lexical.py says why).
MAX_LEXICAL_CHARS = 1000
MAX_ITER = 2000


def record_text(item: LoadedRecord) -> str:
    """The text the router reads for this record (title and OCR text, normalised)."""
    return Post(title=item.record.title, ocr_text=item.record.ocr_text).text()


def fit_lexical_model(texts: Sequence[str], labels: np.ndarray) -> LexicalModel:
    """TF-IDF (word 1–2-grams + char_wb 2–5-grams) into a class-balanced logistic regression.

    Exactly scikit-learn's `Pipeline(FeatureUnion(word, char), LogisticRegression)` of the
    baseline, kept as its parts so that it can be stored without pickle.
    """
    vectorizers = {part: new_vectorizer(part) for part in ANALYZERS}
    features = scipy.sparse.hstack(
        [vectorizers[part].fit_transform(list(texts)) for part in ANALYZERS], format="csr"
    )
    classifier = LogisticRegression(class_weight="balanced", max_iter=MAX_ITER)
    classifier.fit(features, labels)
    return LexicalModel(
        vectorizers, classifier.coef_[0].astype(np.float64), float(classifier.intercept_[0])
    )


@dataclass
class LexicalFit:
    """Each category's n-gram model, or why it has none, and the seconds each fit took."""

    models: dict[str, LexicalModel]
    notes: dict[str, str]
    seconds: dict[str, float]


def fit_lexical_models(
    records: Sequence[LoadedRecord], categories: Sequence[str], max_chars: int | None = None
) -> LexicalFit:
    """One model per category on its own annotated posts (label ≠ -1), each text cut to
    `max_chars` as the served head cuts it; a category without both classes among them gets
    none (and a note), not a crash."""
    texts = [truncate(record_text(item), max_chars) for item in records]
    labels = label_matrix(records, categories)
    fit = LexicalFit({}, {}, {})
    for k, category in enumerate(categories):
        keep = np.flatnonzero(labels[:, k] != -1)
        y = labels[keep, k]
        if keep.size == 0 or np.unique(y).size < 2:
            fit.notes[category] = f"{keep.size} annotated training posts, not both classes"
            continue
        started = time.perf_counter()
        fit.models[category] = fit_lexical_model([texts[i] for i in keep], y)
        fit.seconds[category] = round(time.perf_counter() - started, 1)
    return fit


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


def choose_weights(
    labels: np.ndarray,
    router_logits: np.ndarray,
    lexical_logits: np.ndarray,
    categories: Sequence[str],
    models: Sequence[str],
    grid: Sequence[float] = WEIGHT_GRID,
) -> dict[str, float]:
    """Per category, the w of `grid` with the best (APR@R90, PR-AUC, −w) on `labels`.

    A category without a model, or without both classes among its annotated posts (no
    metric is defined), keeps w = 0: the router alone.
    """
    weights: dict[str, float] = {}
    for k, category in enumerate(categories):
        weights[category] = 0.0
        if category not in models:
            continue
        y = labels[:, [k]]
        best: tuple[float, float, float] | None = None
        for w in grid:
            blended = (1 - w) * router_logits[:, [k]] + w * lexical_logits[:, [k]]
            metrics = evaluate_scores(y, 1 / (1 + np.exp(-blended)), [category])
            m = metrics.categories[category]
            if not m.defined:
                break
            key = (m.apr_r90, m.pr_auc, -w)
            if best is None or key > best:
                best, weights[category] = key, float(w)
    return weights


@dataclass(frozen=True)
class LexicalResult:
    out: Path
    model_version: str
    weights: dict[str, float]
    notes: dict[str, str]


def add_lexical_head(
    model: Path,
    train: Path,
    val: Path,
    out: Path,
    *,
    model_version: str | None = None,
    max_chars: int | None = MAX_LEXICAL_CHARS,
    batch_size: int = 32,
    device: str = "cpu",
    progress: bool = True,
    feature_cache: Path | None = None,
) -> LexicalResult:
    """Fit, pick the weights on `val`, write the blended store to `out` (see the module)."""
    if max_chars is not None and max_chars < 1:
        raise ValueError(f"max_chars must be at least 1, got {max_chars}")
    config = read_config(model)
    if config.lexical_head:
        raise ValueError(f"{model} already has a lexical head; start from the router alone")
    categories = config.categories
    trained = load_records(train, categories, allow_other_categories=True)
    fit = fit_lexical_models(trained.records, categories, max_chars)
    if not fit.models:
        raise ValueError(f"no category of {train} has both classes: nothing to fit")
    validation = load_records(val, categories, allow_other_categories=True)
    router = load_router(model, resolve_device(device))
    router.use_feature_cache(feature_cache)
    dataset = PostDataset(validation.records, categories)
    router_logits = _logit(predict(router, dataset, batch_size, progress))
    texts = [truncate(record_text(item), max_chars) for item in validation.records]
    lexical_logits = np.column_stack(
        [
            fit.models[c].decision(texts) if c in fit.models else np.zeros(len(texts))
            for c in categories
        ]
    )
    labels = label_matrix(validation.records, categories)
    weights = choose_weights(labels, router_logits, lexical_logits, categories, list(fit.models))
    version = model_version or f"{config.model_version}+lexical"
    kept = {c: m for c, m in fit.models.items() if weights[c] > 0}
    blended = LexicalHead(
        categories, kept, weights, fitted_on=f"{train} (weights on {val})", max_chars=max_chars
    )
    out = Path(out)
    copy_router(model, out)
    copied = read_config(out)
    write_config(copied.model_copy(update={"model_version": version, "lexical_head": True}), out)
    blended.save(out)
    (out / "lexical_fit.json").write_text(
        json.dumps({"weights": weights, "fit_seconds": fit.seconds, "notes": fit.notes}, indent=2)
        + "\n"
    )
    return LexicalResult(out, version, weights, fit.notes)
