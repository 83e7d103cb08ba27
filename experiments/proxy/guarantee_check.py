"""Thresholds of each guarantee, calibrated on one split and measured on another.

    python -m experiments.proxy.guarantee_check --model model_store/proxy \
        --val data/unseen-by-shipped/val.jsonl --test data/unseen-by-shipped/test.jsonl \
        --recall 0.9 --out runs/guarantee-check [--write-confidence thresholds/proxy.yaml]

Scores both files once (cached as `<out>/<split>.scored.pkl`: the slow part on CPU), then for
`quantile`, `expected` and `confidence` writes the thresholds file `radar calibrate` would
write and reports, per category, tau, the positives it was calibrated on and the recall and
auto-pass rates it realises on the test file (bootstrap 95 % interval). This is the check
behind the shipped `thresholds/proxy.yaml`: recall on posts the calibration never saw.
"""

import argparse
import pickle
from pathlib import Path

from app.evaluation.calibrate import calibrate_scored
from app.evaluation.evaluate import ScoredData, check_thresholds, score_data
from app.evaluation.guarantees import GUARANTEES

# Pickle is safe here: the cache files are this script's own output in a local run directory.


def scored(model: Path, data: Path, cache: Path, batch_size: int) -> ScoredData:
    if cache.is_file():
        cached: ScoredData = pickle.loads(cache.read_bytes())  # noqa: S301 -- our own file
        if cached.data == data and cached.model_dir == model:
            return cached
    result = score_data(model, data, batch_size=batch_size, progress=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(pickle.dumps(result))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="model-store directory")
    parser.add_argument("--val", type=Path, required=True, help="calibration JSONL")
    parser.add_argument("--test", type=Path, required=True, help="held-out JSONL")
    parser.add_argument("--recall", type=float, default=0.9, help="recall target (0.9)")
    parser.add_argument("--delta", type=float, default=0.05, help="confidence's δ (0.05)")
    parser.add_argument("--out", type=Path, default=Path("runs/guarantee-check"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--write-confidence", type=Path, help="also write the confidence file here (to ship)"
    )
    args = parser.parse_args(argv)
    val = scored(args.model, args.val, args.out / "val.scored.pkl", args.batch_size)
    test = scored(args.model, args.test, args.out / "test.scored.pkl", args.batch_size)
    print(
        "| guarantee | category | tau | val positives | test recall [95 % CI] | test APR "
        "| share of all test posts passed |"
    )
    print("|---|---|---|---|---|---|---|")
    for guarantee in GUARANTEES:
        targets = [args.out / f"{guarantee}.yaml"]
        if guarantee == "confidence" and args.write_confidence:
            targets.append(args.write_confidence)
        for path in targets:
            result = calibrate_scored(
                val,
                path,
                recall=args.recall,
                guarantee=guarantee,
                delta=args.delta,
                allow_few_positives=True,
                min_positives=1,
            )
        taus = {c.category: c.tau for c in result.categories}
        check = check_thresholds(test.labels, test.scores, test.categories, taus)
        for c in result.categories:
            got = check.categories[c.category]
            print(
                f"| {guarantee} | {c.category} | {c.tau:.4f} | {c.n_positive} | "
                f"{100 * got.recall:.2f} [{100 * got.recall_low:.2f}, {100 * got.recall_high:.2f}]"
                f" | {100 * got.auto_pass_rate:.2f} | {100 * got.pass_share_all:.2f} |"
            )
        print(
            f"| {guarantee} | **overall auto-pass** | | | | | "
            f"**{100 * check.overall_auto_pass_rate:.2f}** |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
