"""The lexical head: per-category TF-IDF n-grams → logistic regression, blended with the router.

Why a router needs one: on the public corpus a bag of word and character n-grams ranks some
categories better than the neural router does (smear memes, whose OCR text names its target:
PR-AUC 70.5 against 60.4; docs/results.md), and the two err on different posts. The head is the
TF-IDF baseline of `experiments/proxy/baselines.py`, fitted on the same training posts; the
router's score for category k is then

    p_k = sigmoid((1 - w_k) · z_k(router) + w_k · z_k(lexical))

with `w_k` in [0, 1] picked per category on the validation split (`app.training.lexical`):
w = 0 is the neural router alone, w = 1 the n-gram model alone. It reads `Post.text()`, the
normalised string every backbone reads, cut to its first `max_chars` characters (1,000 for
`radar lexical`): n-gram analysis costs time in proportion to the text, and unbounded it was
0.3 s a post for the 2 × 10,000 characters a request may carry, on the model thread; at 1,000
it is ~15 ms, about a forward's share, while 99 % of the corpus's training posts are shorter
(857 characters at the 99th percentile; the neural encoder reads 64 tokens).

Stored without pickle (a model store is code-free data: `torch.load` and `joblib` both run
code from the file): `lexical.json` holds the vectorizer settings, each category's vocabulary
and the blend weights; `lexical.safetensors` the IDF vectors, coefficients and intercepts.
The vectorizers are scikit-learn's own, rebuilt from vocabulary and IDF (the `idf_` setter
exists for this); only `X · coef + intercept`, the logistic regression's decision function, is
written out here, so that the loaded head needs no fitted estimator object.
"""

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from sklearn.feature_extraction.text import TfidfVectorizer

from app.model.errors import ModelStoreError
from app.model.files import is_file

LEXICAL_CONFIG = "lexical.json"
LEXICAL_WEIGHTS = "lexical.safetensors"
FORMAT_VERSION = 1
# The baseline's features (experiments/proxy/baselines.py): word 1–2-grams and char_wb
# 2–5-grams, sublinear tf, terms in at least 2 training posts, each part l2-normalised.
ANALYZERS: dict[str, dict[str, Any]] = {
    "word": {"analyzer": "word", "ngram_range": (1, 2), "sublinear_tf": True, "min_df": 2},
    "char": {"analyzer": "char_wb", "ngram_range": (2, 5), "sublinear_tf": True, "min_df": 2},
}


def truncate(text: str, max_chars: int | None) -> str:
    """The part of `text` the n-gram models read: its first `max_chars` characters."""
    return text if max_chars is None else text[:max_chars]


def new_vectorizer(part: str, vocabulary: Sequence[str] | None = None) -> TfidfVectorizer:
    """The TF-IDF vectorizer of one feature part, fixed to `vocabulary` when given."""
    return TfidfVectorizer(**ANALYZERS[part], vocabulary=list(vocabulary) if vocabulary else None)


@dataclass(frozen=True)
class LexicalModel:
    """One category's n-gram model: fitted vectorizers (one per part) and a linear decision."""

    vectorizers: Mapping[str, TfidfVectorizer]
    coef: np.ndarray  # [sum of the parts' vocabulary sizes], float64
    intercept: float

    def features(self, texts: Sequence[str]) -> scipy.sparse.csr_matrix:
        """The parts' TF-IDF rows side by side (what scikit-learn's `FeatureUnion` does)."""
        parts = [self.vectorizers[name].transform(texts) for name in ANALYZERS]
        return scipy.sparse.hstack(parts, format="csr")

    def decision(self, texts: Sequence[str]) -> np.ndarray:
        """The logistic regression's logit per text, `[N]`."""
        return np.asarray(self.features(texts) @ self.coef, dtype=np.float64) + self.intercept

    def vocabularies(self) -> dict[str, list[str]]:
        """Each part's terms in column order."""
        return {
            name: [term for term, _ in sorted(v.vocabulary_.items(), key=lambda kv: kv[1])]
            for name, v in self.vectorizers.items()
        }


@dataclass(frozen=True)
class LexicalHead:
    """The n-gram models of some categories and every category's blend weight."""

    categories: tuple[str, ...]
    models: Mapping[str, LexicalModel]
    weights: Mapping[str, float]  # 0 for a category without a model
    fitted_on: str = ""  # provenance: what the models were trained on
    max_chars: int | None = None  # texts are cut to this many characters (None: whole)

    def __post_init__(self) -> None:
        for category, weight in self.weights.items():
            if not 0.0 <= weight <= 1.0:
                raise ValueError(f"blend weight of {category!r} must be in [0, 1], got {weight}")
            if weight > 0 and category not in self.models:
                raise ValueError(f"{category!r} has blend weight {weight} but no lexical model")
        unknown = sorted((set(self.models) | set(self.weights)) - set(self.categories))
        if unknown:
            raise ValueError(f"lexical entries for categories the router lacks: {unknown}")

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        """`[N, K]` lexical logits in category order (0 for a category without a model)."""
        out = np.zeros((len(texts), len(self.categories)))
        texts = [truncate(text, self.max_chars) for text in texts]
        for k, category in enumerate(self.categories):
            if category in self.models and self.weights.get(category, 0.0) > 0:
                out[:, k] = self.models[category].decision(texts)
        return out

    def blend(
        self,
        texts: Sequence[str],
        router_logits: np.ndarray,
        lexical_logits: np.ndarray | None = None,
    ) -> np.ndarray:
        """`(1 - w) · router + w · lexical` per category, `[N, K]` logits; `lexical_logits`:
        `logits(texts)` computed already (`Router.prepare`, off the model thread)."""
        w = np.array([self.weights.get(c, 0.0) for c in self.categories])
        if not w.any():
            return np.asarray(router_logits, dtype=np.float64)
        lexical = self.logits(texts) if lexical_logits is None else lexical_logits
        return (1.0 - w) * router_logits + w * lexical

    def save(self, store_dir: Path | str) -> None:
        """Write `lexical.json` and `lexical.safetensors` into a model-store directory."""
        store_dir = Path(store_dir)
        tensors: dict[str, np.ndarray] = {}
        models: dict[str, Any] = {}
        for category, model in self.models.items():
            for part, vectorizer in model.vectorizers.items():
                tensors[f"{category}.{part}.idf"] = np.asarray(vectorizer.idf_, dtype=np.float64)
            tensors[f"{category}.coef"] = np.asarray(model.coef, dtype=np.float64)
            tensors[f"{category}.intercept"] = np.array([model.intercept], dtype=np.float64)
            models[category] = {"vocabulary": model.vocabularies()}
        config = {
            "format_version": FORMAT_VERSION,
            "analyzers": {
                k: {**v, "ngram_range": list(v["ngram_range"])} for k, v in ANALYZERS.items()
            },
            "weights": dict(self.weights),
            "fitted_on": self.fitted_on,
            "max_chars": self.max_chars,
            "models": models,
        }
        save_file(tensors, str(store_dir / LEXICAL_WEIGHTS))
        (store_dir / LEXICAL_CONFIG).write_text(json.dumps(config, ensure_ascii=False) + "\n")


def has_lexical_head(store_dir: Path | str) -> bool:
    return is_file(Path(store_dir) / LEXICAL_CONFIG)


def load_lexical_head(store_dir: Path | str, categories: Sequence[str]) -> LexicalHead:
    """Read a store's lexical head; `ModelStoreError` names the file and what is wrong."""
    store_dir = Path(store_dir)
    config_path, weights_path = store_dir / LEXICAL_CONFIG, store_dir / LEXICAL_WEIGHTS
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelStoreError(config_path, f"not a readable lexical head: {exc}") from None
    if not is_file(weights_path):
        raise ModelStoreError(weights_path, f"missing ({LEXICAL_CONFIG} is there)")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise ModelStoreError(weights_path, f"not a readable safetensors file: {exc}") from None
    try:
        return _head_from(config, tensors, tuple(categories))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelStoreError(config_path, f"invalid lexical head: {exc!r}") from None


def _head_from(
    config: dict[str, Any], tensors: Mapping[str, np.ndarray], categories: tuple[str, ...]
) -> LexicalHead:
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"format_version {config.get('format_version')!r}, not {FORMAT_VERSION}")
    analyzers = {
        k: {**v, "ngram_range": tuple(v["ngram_range"])} for k, v in config["analyzers"].items()
    }
    if analyzers != ANALYZERS:
        # The features are this module's; a file written with others would score differently.
        raise ValueError(f"analyzers {analyzers} differ from this code's {ANALYZERS}")
    models: dict[str, LexicalModel] = {}
    for category, entry in config["models"].items():
        vectorizers: dict[str, TfidfVectorizer] = {}
        width = 0
        for part in ANALYZERS:
            vocabulary = entry["vocabulary"][part]
            vectorizer = new_vectorizer(part, vocabulary)
            vectorizer.idf_ = tensors[f"{category}.{part}.idf"]  # checks the length
            vectorizers[part] = vectorizer
            width += len(vocabulary)
        coef = tensors[f"{category}.coef"]
        if coef.shape != (width,):
            raise ValueError(f"{category}.coef has shape {coef.shape}, the vocabularies {width}")
        intercept = float(tensors[f"{category}.intercept"][0])
        models[category] = LexicalModel(vectorizers, coef, intercept)
    weights = {str(k): float(v) for k, v in config["weights"].items()}
    max_chars = config.get("max_chars")
    if max_chars is not None and (not isinstance(max_chars, int) or max_chars < 1):
        raise ValueError(f"max_chars must be a positive integer or null, got {max_chars!r}")
    return LexicalHead(categories, models, weights, str(config.get("fitted_on", "")), max_chars)
