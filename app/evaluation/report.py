"""Reports of `radar evaluate`: the printed table, report.md, report.json and PNG plots.

Undefined numbers (a category without positives) print as "n/a"; JSON has them as null.
Plots use matplotlib's object API (`Figure` + the Agg canvas its `savefig` picks for PNG), not
pyplot: no global backend switch, no GUI, no figure left open in a long-running process.
"""

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from app.evaluation.calibrate import CalibrationResult
from app.evaluation.evaluate import ModelEvaluation, oracle_apr_at
from app.evaluation.guarantees import PlanRow
from app.evaluation.metrics import RECALL_TARGETS, CategoryMetrics, _annotated, _curve

NA = "n/a"
METRIC_HEADER = (
    "category",
    "annotated",
    "positive",
    "PR-AUC",
    "R@P60",
    "APR@R90",
    "APR@R95",
    "floor 1-R (90/95)",
    "oracle (90/95)",
)
CHECK_HEADER = ("category", "tau", "recall [95% CI]", "APR (annotated)", "pass (all posts)")


def fmt(value: float | None, digits: int = 3) -> str:
    """A number for a table: "n/a" when undefined (None/NaN), "-inf"/"inf" kept as such."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NA
    if isinstance(value, float) and math.isinf(value):
        return "-inf" if value < 0 else "inf"
    return f"{value:.{digits}f}"


def metric_rows(evaluation: ModelEvaluation) -> list[list[str]]:
    """One row per category, then the macro average over categories with defined metrics."""
    report = evaluation.metrics
    floor = "/".join(f"{1 - r:.2f}" for r in RECALL_TARGETS)
    rows = [
        _metric_row(m, floor, _pair(evaluation.oracle[m.category]))
        for m in report.categories.values()
    ]
    avg = report.averages
    rows.append(
        [
            f"average ({report.n_defined} of {len(report.categories)})",
            str(sum(m.n_annotated for m in report.categories.values())),
            str(sum(m.n_positive for m in report.categories.values())),
            *(fmt(avg[key]) for key in ("pr_auc", "r_at_p60", "apr_r90", "apr_r95")),
            floor,
            _pair(evaluation.oracle_average),
        ]
    )
    return rows


def _metric_row(m: CategoryMetrics, floor: str, oracle: str) -> list[str]:
    values = (m.pr_auc, m.r_at_p60, m.apr_r90, m.apr_r95)
    counts = (str(m.n_annotated), str(m.n_positive))
    return [m.category, *counts, *map(fmt, values), floor, oracle]


def _pair(oracle: dict[str, float]) -> str:
    """A perfect ranker's APR@R90/APR@R95 as "0.533/0.517"; "n/a" when undefined."""
    if math.isnan(oracle["apr_r90"]):
        return NA
    return f"{fmt(oracle['apr_r90'])}/{fmt(oracle['apr_r95'])}"


def check_rows(evaluation: ModelEvaluation) -> list[list[str]]:
    """One row per category for the thresholds check (empty without thresholds)."""
    if evaluation.thresholds is None:
        return []
    rows = []
    for c in evaluation.thresholds.categories.values():
        ci = f"{fmt(c.recall)} [{fmt(c.recall_low)}, {fmt(c.recall_high)}]"
        if math.isnan(c.recall):
            ci = NA
        rows.append([c.category, fmt(c.tau, 4), ci, fmt(c.auto_pass_rate), fmt(c.pass_share_all)])
    return rows


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A fixed-width table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))])

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table, numbers right-aligned."""
    align = ["---", *("---:" for _ in header[1:])]
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def _overall_line(evaluation: ModelEvaluation) -> str:
    check = evaluation.thresholds
    if check is None:
        return ""
    n = len(evaluation.scored.post_ids)
    return (
        f"overall auto-pass rate (posts dispatched to no category): "
        f"{fmt(check.overall_auto_pass_rate)} of {n} posts"
    )


def render_text(evaluation: ModelEvaluation) -> str:
    """What `radar evaluate` prints."""
    scored = evaluation.scored
    parts = [
        f"model {scored.model_version} on {scored.data} ({len(scored.post_ids)} posts, "
        f"{scored.data_fingerprint[:19]}…)",
        "",
        text_table(METRIC_HEADER, metric_rows(evaluation)),
    ]
    parts += _notes(evaluation)
    if evaluation.thresholds is not None:
        check = evaluation.thresholds
        parts += ["", f"thresholds {check.version} ({check.source}):"]
        parts += [text_table(CHECK_HEADER, check_rows(evaluation)), _overall_line(evaluation)]
    return "\n".join(parts)


def _notes(evaluation: ModelEvaluation) -> list[str]:
    notes = [
        f"{m.category}: n/a ({m.undefined_reason})"
        for m in evaluation.metrics.categories.values()
        if not m.defined
    ]
    if evaluation.scored.ignored_categories:
        ignored = ", ".join(evaluation.scored.ignored_categories)
        notes.append(f"labels of categories the model does not have were ignored: {ignored}")
    return ["", *notes] if notes else []


def render_markdown(evaluation: ModelEvaluation, plots: Sequence[Path] = ()) -> str:
    """report.md: provenance, the metric table, the thresholds check, the plots."""
    scored = evaluation.scored
    parts = [
        f"# Evaluation of `{scored.model_version}`",
        "",
        f"- model: `{scored.model_dir}` (model_version `{scored.model_version}`)",
        f"- data: `{scored.data}`, {len(scored.post_ids)} posts, `{scored.data_fingerprint}`",
        f"- date: {evaluation.date}",
        f"- command: `{evaluation.command}`",
        "",
        "Per category on its own annotated samples. PR-AUC = average precision (step-wise, as "
        "scikit-learn); R@P60 = highest recall at precision ≥ 0.60; APR@R = share of annotated "
        "samples auto-passed at the highest threshold keeping recall ≥ R. Floor: a random "
        "router passes 1 − R; oracle: a perfect ranker, (n − ⌈R·P⌉)/n (at R = 1, the share "
        "of annotated negatives).",
        "",
        markdown_table(METRIC_HEADER, metric_rows(evaluation)),
        *_notes(evaluation),
    ]
    if evaluation.thresholds is not None:
        check = evaluation.thresholds
        parts += ["", f"## Thresholds `{check.version}` (`{check.source}`)", ""]
        parts += [markdown_table(CHECK_HEADER, check_rows(evaluation)), ""]
        parts += [_overall_line(evaluation) + ".", ""]
        parts.append("Recall intervals: percentile bootstrap over the annotated samples.")
    if plots:
        parts += ["", "## Plots", "", *(f"![{p.stem}]({p.name})" for p in plots)]
    return "\n".join(parts) + "\n"


def render_calibration(result: CalibrationResult) -> str:
    """What `radar calibrate` prints: the rule, the chosen taus and what they do on the data.

    "miss bound" is the rule's statistic at tau (≤ 1 − target when tau was calibrated, n/a
    when tau was forced to 0 by too few positives or under `quantile`).
    """
    header = (
        "category",
        "target",
        "tau",
        "recall",
        "miss bound",
        "expected APR",
        "positive",
        "needed",
        "annotated",
    )
    rows = [
        [
            c.category,
            fmt(c.recall_target, 2),
            fmt(c.tau, 4),
            fmt(c.achieved_recall),
            fmt(c.miss_rate_bound),
            fmt(c.expected_auto_pass_rate),
            str(c.n_positive),
            "never" if c.positives_needed is None else str(c.positives_needed),
            str(c.n_annotated),
        ]
        for c in result.categories
    ]
    overall = fmt(result.expected_overall_auto_pass_rate)
    lines = [f"guarantee: {promise(result.guarantee, result.delta)}"]
    lines.append(text_table(header, rows))
    if result.kept:
        lines.append(f"kept from {result.base}: {', '.join(result.kept)}")
    lines += [
        f"expected overall auto-pass rate on this data: {overall}",
        f"thresholds {result.version!r} written to {result.path}",
    ]
    return "\n".join(lines)


def promise(guarantee: str, delta: float | None) -> str:
    """What a rule promises about new posts, in one line."""
    if guarantee == "confidence":
        return (
            f"confidence: recall >= target on new posts with probability >= {1 - (delta or 0):g}"
            " (Learn-then-Test / Clopper-Pearson)"
        )
    if guarantee == "expected":
        return "expected: expected recall on new posts >= target (conformal risk control)"
    return "quantile: recall >= target on this data only; no guarantee on new posts"


def render_plan(
    rows: Sequence[PlanRow], guarantee: str, delta: float, data: Path | str | None
) -> str:
    """What `radar calibrate --plan` prints: positives needed per category, and had."""
    header = ("category", "target", "positives needed", "positives", "annotated", "enough")
    # Short of positives, a guarantee dispatches everything; `quantile` refuses.
    short = "no: refused" if guarantee == "quantile" else "no: tau 0, dispatch all"
    table = [
        [
            r.category,
            fmt(r.recall_target, 2),
            "never" if r.positives_needed is None else str(r.positives_needed),
            NA if r.n_positive is None else str(r.n_positive),
            NA if r.n_annotated is None else str(r.n_annotated),
            NA if r.enough is None else ("yes" if r.enough else short),
        ]
        for r in rows
    ]
    source = f"counted in {data} (labels only, nothing scored)" if data else "no --data given"
    return "\n".join([f"guarantee: {promise(guarantee, delta)}", text_table(header, table), source])


def write_report(evaluation: ModelEvaluation, out_dir: Path | str) -> list[Path]:
    """Write report.md, report.json and the PNG plots into `out_dir`; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(evaluation, out_dir)
    document = evaluation.to_dict() | {"plots": [p.name for p in plots]}
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    md_path = out_dir / "report.md"
    md_path.write_text(render_markdown(evaluation, plots))
    return [md_path, json_path, *plots]


def write_plots(evaluation: ModelEvaluation, out_dir: Path) -> list[Path]:
    """`pr_<category>.png` and `apr_<category>.png` per category that has a positive."""
    scored = evaluation.scored
    written: list[Path] = []
    for k, name in enumerate(scored.categories):
        m = evaluation.metrics.categories[name]
        if not m.defined:
            continue  # no positive: no curve to draw
        pos, s = _annotated(scored.labels[:, k], scored.scores[:, k])
        _, tps, fps = _curve(pos, s)  # the partitions the metrics use, one per distinct score
        recall, precision = tps / tps[-1], tps / (tps + fps)
        apr = (s.size - (tps + fps)) / s.size
        written.append(_pr_plot(m, recall, precision, out_dir))
        # APR@R takes the first partition reaching R: drop those that add no recall.
        first = np.r_[True, np.diff(recall) > 0]
        written.append(_apr_plot(m, recall[first], apr[first], out_dir))
    return written


def _pr_plot(m: CategoryMetrics, recall: np.ndarray, precision: np.ndarray, out: Path) -> Path:
    # where="pre": precision P_n holds on (R_{n-1}, R_n], so the area is exactly the AP.
    fig = Figure(figsize=(5, 4), dpi=100)
    ax = fig.add_subplot()
    x, y = np.r_[0.0, recall], np.r_[precision[0], precision]
    ax.step(x, y, where="pre", label=f"router (AP {fmt(m.pr_auc)})")
    ax.axhline(m.n_positive / m.n_annotated, color="grey", ls="--", label="random ranker")
    ax.axhline(0.60, color="tab:red", ls=":", lw=1, label="precision 0.60")
    if m.r_at_p60 > 0:
        at = precision[np.argmax(recall >= m.r_at_p60)]  # the curve's point at that recall
        ax.plot([m.r_at_p60], [at], "o", color="tab:red", label=f"R@P60 {fmt(m.r_at_p60)}")
    _finish(ax, f"{m.category}: precision-recall", "recall", "precision")
    path = out / f"pr_{m.category}.png"
    fig.savefig(path)
    return path


def _apr_plot(m: CategoryMetrics, recall: np.ndarray, apr: np.ndarray, out: Path) -> Path:
    # APR@R for R in (R_{j-1}, R_j] is the APR of partition j: a step, like the PR curve.
    fig = Figure(figsize=(5, 4), dpi=100)
    ax = fig.add_subplot()
    ax.step(np.r_[0.0, recall], np.r_[apr[0], apr], where="pre", label="router")
    grid = np.linspace(0.0, 1.0, 201)
    ax.plot(grid, 1.0 - grid, color="grey", ls="--", label="random router (1 - R)")
    oracle = [oracle_apr_at(m.n_annotated, m.n_positive, r) for r in grid]
    ax.plot(grid, oracle, color="tab:green", ls=":", label="oracle (perfect ranker)")
    for target, value in zip(RECALL_TARGETS, (m.apr_r90, m.apr_r95), strict=True):
        ax.plot([target], [value], "o", label=f"APR@R{round(target * 100)} {fmt(value)}")
    _finish(ax, f"{m.category}: auto-pass rate vs recall", "recall target R", "auto-pass rate")
    path = out / f"apr_{m.category}.png"
    fig.savefig(path)
    return path


def _finish(ax: Axes, title: str, xlabel: str, ylabel: str) -> None:
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, xlim=(0, 1.01), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
