"""Build the proxy benchmark: public moderation datasets as disjoint annotation pipelines.

`python -m experiments.proxy.data --shared ../shared/data --out data/proxy` writes
`train.jsonl`, `val.jsonl`, `test.jsonl` (DESIGN.md's training-data format) and
`manifest.json`. Every source of `proxy_sources.SOURCES` labels its own categories (0/1) and
leaves the others at -1, "not annotated". Splits are stratified per source x stratum, fixed
by the seed, and the output is byte-identical for the same inputs and arguments. Image paths
are relative to the output folder (images are not copied). See `docs/proxy_data.md`.
"""

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from experiments.proxy.manifest import (
    SPLITS,
    CategoryCounts,
    Manifest,
    SourceSummary,
    SplitSummary,
    summary_table,
)
from experiments.proxy.sources import CATEGORIES, SOURCES, Source, SourceRow

BUILDER = "proxy-v1"  # bump when the output for the same arguments changes
# 1,600 rows per source x 7 sources (ETHOS all 997, memes all 950) gives
# about 10k posts, 7k of them for training: what a proxy run on 2 CPU cores can afford.
DEFAULT_MAX_PER_SOURCE = 1600
DEFAULT_VAL_FRAC = 0.1
DEFAULT_TEST_FRAC = 0.2

GroupKey = tuple[str, str]  # (upstream split or "", stratum)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _shuffled(rows: Iterable[SourceRow], key: str) -> list[SourceRow]:
    """Rows in a seeded random order; sorting first makes it independent of read order.

    `random.Random(str)` seeds from the string's SHA-512, so it does not depend on
    PYTHONHASHSEED, unlike `hash()`.
    """
    ordered = sorted(rows, key=lambda row: row.post_id)
    random.Random(key).shuffle(ordered)  # noqa: S311 -- a reproducible split, not a secret
    return ordered


def allocate(sizes: dict[GroupKey, int], total: int) -> dict[GroupKey, int]:
    """Split `total` over groups in proportion to their sizes (largest remainder, stable)."""
    available = sum(sizes.values())
    if total >= available:
        return dict(sizes)
    quotas = {key: size * total / available for key, size in sizes.items()}
    counts = {key: math.floor(quota) for key, quota in quotas.items()}
    by_remainder = sorted(sizes, key=lambda key: (counts[key] - quotas[key], key))
    for key in by_remainder[: total - sum(counts.values())]:
        counts[key] += 1
    return counts


def _deduplicate(rows: Iterable[SourceRow]) -> tuple[list[SourceRow], Counter[str]]:
    """Drop empty posts, repeated ids and repeated contents (whole groups if labels disagree).

    Exact repeats (SMS and YouTube spam is often re-posted verbatim) would otherwise land in
    train and test at once and inflate the test metrics.
    """
    dropped: Counter[str] = Counter()
    seen_ids: set[str] = set()
    groups: dict[tuple[str, str, str], list[SourceRow]] = {}
    for row in rows:
        if not (row.title or row.ocr_text or row.image):
            dropped["empty"] += 1
        elif row.post_id in seen_ids:
            dropped["duplicate"] += 1
        else:
            seen_ids.add(row.post_id)
            content = (row.title, row.ocr_text, str(row.image or ""))
            groups.setdefault(content, []).append(row)
    kept = []
    for group in groups.values():
        if len({tuple(sorted(row.labels.items())) for row in group}) > 1:
            dropped["conflicting"] += len(group)
        else:
            kept.append(group[0])
            dropped["duplicate"] += len(group) - 1
    return kept, dropped


def _split_group(
    members: list[SourceRow], val_frac: float, test_frac: float
) -> dict[str, list[SourceRow]]:
    """Cut one shuffled stratum into test, val and train (rounding half up per stratum)."""
    n_test = math.floor(len(members) * test_frac + 0.5)
    n_val = min(math.floor(len(members) * val_frac + 0.5), len(members) - n_test)
    return {
        "test": members[:n_test],
        "val": members[n_test : n_test + n_val],
        "train": members[n_test + n_val :],
    }


def _read_source(source: Source, shared: Path) -> list[SourceRow]:
    """All rows of one source, checked to carry exactly that source's own labels."""
    for name in source.files:
        if not (shared / name).is_file():
            raise FileNotFoundError(f"{source.name}: missing input file {shared / name}")
    rows = list(source.read(shared))
    for row in rows:
        if set(row.labels) != set(source.categories) or set(row.labels.values()) - {0, 1}:
            raise ValueError(f"{row.post_id}: labels {dict(row.labels)} for {source.categories}")
    return rows


def _split_source(
    source: Source,
    shared: Path,
    *,
    seed: int,
    max_per_source: int | None,
    val_frac: float,
    test_frac: float,
) -> tuple[dict[str, list[SourceRow]], SourceSummary]:
    """One source's rows, cleaned, capped (stratified) and assigned to splits."""
    read = _read_source(source, shared)
    rows, dropped = _deduplicate(read)
    grouped: dict[GroupKey, list[SourceRow]] = {}
    for row in rows:
        grouped.setdefault((row.split or "", row.stratum), []).append(row)
    # One shuffle per group serves both the cap (a prefix) and the split (prefixes of that).
    groups = {
        key: _shuffled(members, f"{seed}:{source.name}:{key[0]}:{key[1]}")
        for key, members in sorted(grouped.items())
    }
    if max_per_source is not None:
        quotas = allocate({key: len(members) for key, members in groups.items()}, max_per_source)
        groups = {key: members[: quotas[key]] for key, members in groups.items()}
    splits: dict[str, list[SourceRow]] = {split: [] for split in SPLITS}
    for (upstream, _), members in groups.items():
        if upstream:
            splits[upstream].extend(members)
        else:
            for split, part in _split_group(members, val_frac, test_frac).items():
                splits[split].extend(part)
    summary = SourceSummary(
        name=source.name,
        categories=list(source.categories),
        files={name: _sha256((shared / name).read_bytes()) for name in source.files},
        rows_read=len(read),
        dropped_empty=dropped["empty"],
        dropped_duplicate=dropped["duplicate"],
        dropped_conflicting=dropped["conflicting"],
        rows_kept=len(rows),
        rows_used=sum(len(part) for part in splits.values()),
        upstream_split=any(row.split for row in rows),
    )
    return splits, summary


def _record(row: SourceRow, out: Path) -> dict[str, object]:
    """One JSONL object: the post fields, image paths relative to `out`, all K labels."""
    images = [] if row.image is None else [Path(os.path.relpath(row.image, out)).as_posix()]
    return {
        "post_id": row.post_id,
        "title": row.title,
        "ocr_text": row.ocr_text,
        "images": images,
        "labels": {category: row.labels.get(category, -1) for category in CATEGORIES},
    }


def _write_split(rows: list[SourceRow], out: Path, split: str) -> SplitSummary:
    """Write one split's JSONL and summarise it."""
    lines = [json.dumps(_record(row, out), ensure_ascii=False) + "\n" for row in rows]
    data = "".join(lines).encode("utf-8")
    (out / f"{split}.jsonl").write_bytes(data)
    counts = {
        category: CategoryCounts(
            annotated=sum(category in row.labels for row in rows),
            positive=sum(row.labels.get(category) == 1 for row in rows),
        )
        for category in CATEGORIES
    }
    per_source = Counter(row.post_id.split(":", 1)[0] for row in rows)
    return SplitSummary(
        file=f"{split}.jsonl",
        sha256=_sha256(data),
        posts=len(rows),
        sources={source.name: per_source[source.name] for source in SOURCES},
        categories=counts,
    )


def _check_arguments(max_per_source: int | None, val_frac: float, test_frac: float) -> None:
    """Refuse split fractions or caps that cannot give three splits."""
    if max_per_source is not None and max_per_source < 1:
        raise ValueError(f"max_per_source must be >= 1 or None, not {max_per_source}")
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise ValueError(f"need 0 <= val_frac, test_frac and val+test < 1: {val_frac}, {test_frac}")


def build_proxy_dataset(
    shared: Path,
    out: Path,
    *,
    seed: int = 0,
    max_per_source: int | None = DEFAULT_MAX_PER_SOURCE,
    val_frac: float = DEFAULT_VAL_FRAC,
    test_frac: float = DEFAULT_TEST_FRAC,
) -> Manifest:
    """Read every source under `shared`, write the three splits and the manifest into `out`.

    `max_per_source=None` keeps every row. Sources that ship a split (the memes) keep it;
    the others are split per stratum with `val_frac` / `test_frac`.
    """
    _check_arguments(max_per_source, val_frac, test_frac)
    if not shared.is_dir():
        raise FileNotFoundError(f"shared data folder not found: {shared}")
    out.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[SourceRow]] = {split: [] for split in SPLITS}
    summaries = []
    for source in SOURCES:
        parts, summary = _split_source(
            source,
            shared,
            seed=seed,
            max_per_source=max_per_source,
            val_frac=val_frac,
            test_frac=test_frac,
        )
        summaries.append(summary)
        for split, rows in parts.items():
            splits[split].extend(rows)
    # Mix the sources in each file, so that a reader without its own shuffle gets mixed batches.
    written = {
        split: _write_split(_shuffled(rows, f"{seed}:order:{split}"), out, split)
        for split, rows in splits.items()
    }
    manifest = Manifest(
        builder=BUILDER,
        seed=seed,
        max_per_source=max_per_source,
        val_frac=val_frac,
        test_frac=test_frac,
        shared=Path(os.path.relpath(shared, out)).as_posix(),
        categories=list(CATEGORIES),
        category_sources={
            category: [source.name for source in SOURCES if category in source.categories]
            for category in CATEGORIES
        },
        sources=summaries,
        splits=written,
    )
    text = json.dumps(manifest.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n"
    (out / "manifest.json").write_text(text, encoding="utf-8")
    return manifest


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.proxy.data",
        description="Build the proxy benchmark (disjoint annotation pipelines) as JSONL splits.",
    )
    parser.add_argument(
        "--shared", type=Path, default=Path("../shared/data"), help="the shared data folder"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder (created; files overwritten)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of subsampling and splits")
    parser.add_argument(
        "--max-per-source",
        type=int,
        default=DEFAULT_MAX_PER_SOURCE,
        help="cap on rows per source, stratified subsample; 0 = keep all "
        f"(default {DEFAULT_MAX_PER_SOURCE}: about 7k training posts)",
    )
    parser.add_argument(
        "--val-frac", type=float, default=DEFAULT_VAL_FRAC, help="validation share per stratum"
    )
    parser.add_argument(
        "--test-frac", type=float, default=DEFAULT_TEST_FRAC, help="test share per stratum"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: build, then print the per-category table."""
    parser = _parser()
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        manifest = build_proxy_dataset(
            args.shared,
            args.out,
            seed=args.seed,
            max_per_source=args.max_per_source or None,
            val_frac=args.val_frac,
            test_frac=args.test_frac,
        )
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    elapsed = time.perf_counter() - started
    sys.stdout.write(summary_table(manifest) + "\n(annotated / positive per split)\n")
    sys.stdout.write(f"wrote {args.out} in {elapsed:.1f} s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
