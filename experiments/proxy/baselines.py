"""The baseline a user would try first: per-category TF-IDF + logistic regression.

If a bag of n-grams already ranks posts as well as the router, the router's cost (a
vision-language encoder, distillation from experts) buys nothing. So every router is
measured against it, on the same test posts, with a paired bootstrap of the differences:

    python -m experiments.proxy.baselines --data data/proxy-full --router model_store/proxy

reads `DIR/train.jsonl` and `DIR/test.jsonl` (what `python -m experiments.proxy.data`
writes), trains one model per category on that category's own annotated training posts,
scores every test post for every category, optionally scores the router with
`app.evaluation.evaluate.score_data`, prints DESIGN.md's metrics for both (with the oracle
APR ceiling) and the paired-bootstrap intervals of router − TF-IDF, and writes it all to
`--out`/baselines.json (plus both score matrices, `scores.npz`, to re-bootstrap for free).

The model: word 1–2-grams and char_wb 2–5-grams (TF-IDF, sublinear tf, min_df 2, side by
side) into `LogisticRegression(class_weight="balanced", max_iter=2000)`, fitted by
`app.training.lexical`, the code that gives a router its lexical head. Its text is
`Post(title, ocr_text).text()`, the string the router reads, so the same normalisation
applies to both. It sees no image: on memes it reads only the OCR text.
"""

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from app.data.records import LoadedRecord, label_matrix, load_records
from app.evaluation.bootstrap import (
    AVERAGE,
    DEFAULT_N_BOOT,
    METRICS,
    PairedBootstrap,
    paired_bootstrap,
)
from app.evaluation.evaluate import ScoredData, json_safe, oracle_table, score_data
from app.evaluation.metrics import EvaluationReport, evaluate_scores
from app.model.lexical import LexicalModel
from app.training.lexical import fit_lexical_models, record_text
from experiments.proxy.sources import CATEGORIES

TFIDF = "TF-IDF + LR"
ROUTER = "router"
METRIC_NAMES = {"pr_auc": "PR-AUC", "r_at_p60": "R@P60", "apr_r90": "APR@R90", "apr_r95": "APR@R95"}


@dataclass(frozen=True)
class ScoreMatrix:
    """One system's scores of a test file: `[N, K]` scores and labels in `categories` order."""

    name: str
    categories: tuple[str, ...]
    post_ids: tuple[str, ...]
    labels: np.ndarray  # [N, K] in {-1, 0, 1}
    scores: np.ndarray  # [N, K] float64

    @classmethod
    def from_scored(cls, name: str, scored: ScoredData) -> "ScoreMatrix":
        """A router's `score_data` output under a row name."""
        return cls(name, scored.categories, scored.post_ids, scored.labels, scored.scores)

    def select(self, categories: Sequence[str]) -> "ScoreMatrix":
        """The columns of `categories`, in that order (KeyError names a missing one)."""
        missing = [c for c in categories if c not in self.categories]
        if missing:
            raise KeyError(f"{self.name} has no scores for {missing}")
        columns = [self.categories.index(c) for c in categories]
        return ScoreMatrix(
            self.name,
            tuple(categories),
            self.post_ids,
            self.labels[:, columns],
            self.scores[:, columns],
        )

    def report(self) -> EvaluationReport:
        """DESIGN.md's metrics, each category on its own annotated posts."""
        return evaluate_scores(self.labels, self.scores, self.categories)


@dataclass
class TfidfBaseline:
    """One fitted n-gram model per category; a category it cannot fit scores a constant."""

    categories: tuple[str, ...]
    models: dict[str, LexicalModel] = field(default_factory=dict)
    # Categories without both classes among their annotated training posts: a constant
    # score ranks nothing, which the metrics then show, instead of a crash.
    constant: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    fit_seconds: dict[str, float] = field(default_factory=dict)

    def score_texts(self, texts: Sequence[str]) -> np.ndarray:
        """`[N, K]` positive-class probabilities in `categories` order."""
        scores = np.empty((len(texts), len(self.categories)))
        for k, category in enumerate(self.categories):
            if category in self.models:
                scores[:, k] = 1 / (1 + np.exp(-self.models[category].decision(texts)))
            else:
                scores[:, k] = self.constant[category]
        return scores


def train_tfidf(records: Sequence[LoadedRecord], categories: Sequence[str]) -> TfidfBaseline:
    """Fit each category's model on that category's own annotated posts (label ≠ -1): the
    code that fits a router's lexical head (`app.training.lexical`), so the two are one."""
    fit = fit_lexical_models(records, categories)
    baseline = TfidfBaseline(tuple(categories), fit.models, {}, fit.notes, fit.seconds)
    labels = label_matrix(records, categories)
    for k, category in enumerate(categories):
        if category not in fit.models:
            annotated = labels[labels[:, k] != -1, k]
            baseline.constant[category] = float(annotated.mean()) if annotated.size else 0.0
    return baseline


def tfidf_scores(
    train: Path, test: Path, categories: Sequence[str]
) -> tuple[ScoreMatrix, TfidfBaseline]:
    """Train on `train`, score every post of `test` for every category."""
    trained = load_records(train, categories, allow_other_categories=True)
    baseline = train_tfidf(trained.records, categories)
    tested = load_records(test, categories, allow_other_categories=True)
    matrix = ScoreMatrix(
        TFIDF,
        tuple(categories),
        tuple(item.record.post_id for item in tested),
        label_matrix(tested.records, categories),
        baseline.score_texts([record_text(item) for item in tested]),
    )
    return matrix, baseline


def router_scores(
    model_dir: Path,
    test: Path,
    *,
    name: str = ROUTER,
    batch_size: int = 32,
    feature_cache: Path | None = None,
) -> ScoreMatrix:
    """A saved router's scores of `test` (`score_data`), in the router's category order."""
    scored = score_data(model_dir, test, batch_size=batch_size, feature_cache=feature_cache)
    return ScoreMatrix.from_scored(name, scored)


def compare(
    better: ScoreMatrix, worse: ScoreMatrix, *, n_boot: int = DEFAULT_N_BOOT, seed: int = 0
) -> PairedBootstrap:
    """Paired bootstrap of `better` − `worse` over the categories both score, same test posts."""
    if better.post_ids != worse.post_ids:
        raise ValueError(f"{better.name} and {worse.name} scored different posts")
    shared = [c for c in better.categories if c in worse.categories]
    a, b = better.select(shared), worse.select(shared)
    if not np.array_equal(a.labels, b.labels):
        raise ValueError(f"{better.name} and {worse.name} disagree on the labels")
    return paired_bootstrap(
        a.labels, a.scores, b.scores, shared, names=(a.name, b.name), n_boot=n_boot, seed=seed
    )


def _pct(value: float) -> str:
    return "n/a" if value != value else f"{100 * value:.2f}"


def metrics_table(systems: Sequence[ScoreMatrix]) -> list[str]:
    """Markdown: per category (and average) each metric for every system, then the oracle."""
    reports = [s.report() for s in systems]
    oracle, oracle_average = oracle_table(reports[0])
    names = " / ".join(s.name for s in systems)
    head = ["category", "annotated / positive"]
    head += [f"{METRIC_NAMES[m]} ({names})" for m in METRICS]
    head += ["oracle APR@R90 / R95"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for category in systems[0].categories:
        first = reports[0].categories[category]
        cells = [category, f"{first.n_annotated:,} / {first.n_positive:,}"]
        for m in METRICS:
            cells.append(" / ".join(_pct(getattr(r.categories[category], m)) for r in reports))
        cells.append(f"{_pct(oracle[category]['apr_r90'])} / {_pct(oracle[category]['apr_r95'])}")
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["**average**", ""]
    cells += [" / ".join(_pct(r.averages[m]) for r in reports) for m in METRICS]
    cells.append(f"{_pct(oracle_average['apr_r90'])} / {_pct(oracle_average['apr_r95'])}")
    lines.append("| " + " | ".join(cells) + " |")
    return lines


def bootstrap_table(result: PairedBootstrap) -> list[str]:
    """Markdown: a − b [95 % interval] and the verdict on "b < a", per category and metric."""
    head = ["category", *(f"{METRIC_NAMES[m]} {result.a} − {result.b}" for m in METRICS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    categories = dict.fromkeys(item.category for item in result.differences)
    for category in categories:
        cells = [f"**{category}**" if category == AVERAGE else category]
        for m in METRICS:
            item = result.get(category, m)
            cells.append(
                f"{_pct(item.difference)} [{_pct(item.low)}, {_pct(item.high)}] {item.verdict}"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _categories(data: Path) -> tuple[str, ...]:
    manifest = data / "manifest.json"
    if manifest.is_file():
        return tuple(json.loads(manifest.read_text(encoding="utf-8"))["categories"])
    return CATEGORIES


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.proxy.baselines",
        description="TF-IDF + logistic regression per category, against a router if given.",
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="folder with train.jsonl and test.jsonl"
    )
    parser.add_argument("--router", type=Path, help="a saved router to compare (model store)")
    parser.add_argument(
        "--out", type=Path, default=Path("runs/baselines"), help="output folder (runs/baselines)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="router batch size (32)")
    parser.add_argument(
        "--n-boot", type=int, default=DEFAULT_N_BOOT, help=f"resamples ({DEFAULT_N_BOOT})"
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (0)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Train, score, print the tables, write `--out`/baselines.json and scores.npz."""
    args = _parser().parse_args(argv)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def lap(name: str) -> None:
        timings[name] = round(time.perf_counter() - started - sum(timings.values()), 1)
        print(f"[{name}] {timings[name]:.1f} s", flush=True)

    if args.router is not None:
        router = router_scores(args.router, args.data / "test.jsonl", batch_size=args.batch_size)
        categories = router.categories
        lap("score router")
    else:
        router, categories = None, _categories(args.data)
    tfidf, baseline = tfidf_scores(args.data / "train.jsonl", args.data / "test.jsonl", categories)
    lap("train + score TF-IDF")
    systems = [tfidf] if router is None else [router, tfidf]
    lines = ["## Metrics (percent, test split)", "", *metrics_table(systems)]
    comparison = None
    if router is not None:
        comparison = compare(router, tfidf, n_boot=args.n_boot, seed=args.seed)
        lap("paired bootstrap")
        lines += [
            "",
            f"## Paired bootstrap, {comparison.n_boot} resamples of the {comparison.n_posts:,} "
            "test posts (percentage points, 95 % percentile interval; "
            f'"holds" = {router.name} better, interval above 0)',
            "",
            *bootstrap_table(comparison),
        ]
    timings["total"] = round(time.perf_counter() - started, 1)
    print("\n".join(lines), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    document = {
        "command": shlex.join(
            [
                "python",
                "-m",
                "experiments.proxy.baselines",
                *(sys.argv[1:] if argv is None else argv),
            ]
        ),
        "data": str(args.data),
        "router": None if args.router is None else str(args.router),
        "n_test_posts": len(tfidf.post_ids),
        "categories": list(categories),
        "timings_s": timings,
        "tfidf_fit_seconds": baseline.fit_seconds,
        "tfidf_notes": baseline.notes,
        "systems": {s.name: s.report().to_dict() for s in systems},
        "oracle": oracle_table(tfidf.report())[0],
        "bootstrap": None if comparison is None else comparison.to_dict(),
    }
    (args.out / "baselines.json").write_text(json.dumps(json_safe(document), indent=1) + "\n")
    np.savez_compressed(
        args.out / "scores.npz",
        post_ids=np.array(tfidf.post_ids),
        categories=np.array(categories),
        labels=tfidf.labels,
        tfidf=tfidf.scores,
        **({} if router is None else {"router": router.scores}),
    )
    print(f"wrote {args.out / 'baselines.json'} ({timings['total']:.0f} s in all)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
