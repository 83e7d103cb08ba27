"""The proxy benchmark's manifest (`manifest.json`) and its per-category summary table."""

from pydantic import BaseModel

SPLITS: tuple[str, ...] = ("train", "val", "test")


class CategoryCounts(BaseModel):
    """One category in one split: posts annotated for it, and how many of those are positive."""

    annotated: int
    positive: int


class SplitSummary(BaseModel):
    """One output file: its name, fingerprint and contents per source and per category."""

    file: str
    sha256: str
    posts: int
    sources: dict[str, int]
    categories: dict[str, CategoryCounts]


class SourceSummary(BaseModel):
    """One annotation pipeline: its inputs (with their sha256) and what became of its rows."""

    name: str
    categories: list[str]
    files: dict[str, str]
    rows_read: int
    dropped_empty: int
    dropped_duplicate: int
    dropped_conflicting: int
    rows_kept: int
    rows_used: int
    upstream_split: bool


class Manifest(BaseModel):
    """What was built, from what, with which arguments; written as `manifest.json`."""

    builder: str
    seed: int
    max_per_source: int | None
    val_frac: float
    test_frac: float
    shared: str  # relative to the output folder, like the image paths
    categories: list[str]
    category_sources: dict[str, list[str]]
    sources: list[SourceSummary]
    splits: dict[str, SplitSummary]


def summary_table(manifest: Manifest) -> str:
    """A Markdown table: per category, its sources and annotated/positive posts per split."""
    header = "| category | sources | " + " | ".join(SPLITS) + " |"
    lines = [header, "|---|---|" + "---|" * len(SPLITS)]
    for category in manifest.categories:
        cells = [
            "{annotated:,} / {positive:,}".format(
                **manifest.splits[split].categories[category].model_dump()
            )
            for split in SPLITS
        ]
        sources = ", ".join(manifest.category_sources[category])
        lines.append(f"| {category} | {sources} | " + " | ".join(cells) + " |")
    posts = [f"{manifest.splits[split].posts:,} posts" for split in SPLITS]
    lines.append("| all | | " + " | ".join(posts) + " |")
    return "\n".join(lines)
