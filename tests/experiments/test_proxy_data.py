"""The proxy benchmark builder on the real shared data (small cap), plus its pure helpers."""

import hashlib
import json
from pathlib import Path

import pytest

from experiments.proxy.data import SPLITS, Manifest, allocate, build_proxy_dataset, main
from experiments.proxy.sources import (
    CATEGORIES,
    MEMES_DIR,
    SOURCES,
    clean_text,
    decode_file,
)

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
CAP = 60
FIELDS = {"post_id", "title", "ocr_text", "images", "labels"}
SOURCE_CATEGORIES = {source.name: set(source.categories) for source in SOURCES}
OUTPUTS = ("train.jsonl", "val.jsonl", "test.jsonl", "manifest.json")


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Manifest]]:
    """Seed 0 built twice into sibling folders, and seed 1 once: {name: (folder, manifest)}."""
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED} (expected at ../shared/data)")
    root = tmp_path_factory.mktemp("proxy")
    runs = {"a": 0, "b": 0, "other_seed": 1}
    return {
        name: (root / name, build_proxy_dataset(SHARED, root / name, seed=seed, max_per_source=CAP))
        for name, seed in runs.items()
    }


def read_split(folder: Path, split: str) -> list[dict]:
    lines = (folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def source_of(post: dict) -> str:
    return post["post_id"].split(":", 1)[0]


@pytest.fixture(scope="module")
def posts(builds: dict[str, tuple[Path, Manifest]]) -> dict[str, list[dict]]:
    folder, _ = builds["a"]
    return {split: read_split(folder, split) for split in SPLITS}


def test_every_line_is_a_post_with_all_labels(posts: dict[str, list[dict]]) -> None:
    for split in SPLITS:
        assert posts[split], split
        for post in posts[split]:
            assert set(post) == FIELDS
            assert isinstance(post["title"], str) and isinstance(post["ocr_text"], str)
            assert post["title"] or post["ocr_text"] or post["images"]
            assert post["title"] == post["title"].strip()
            assert "  " not in post["title"] and "\n" not in post["title"]
            assert list(post["labels"]) == list(CATEGORIES)
            assert set(post["labels"].values()) <= {-1, 0, 1}


def test_each_post_is_annotated_only_by_its_own_pipeline(posts: dict[str, list[dict]]) -> None:
    for post in (post for split in SPLITS for post in posts[split]):
        annotated = {category for category, label in post["labels"].items() if label != -1}
        assert annotated == SOURCE_CATEGORIES[source_of(post)], post["post_id"]


def test_no_post_in_two_splits(posts: dict[str, list[dict]]) -> None:
    ids = [post["post_id"] for split in SPLITS for post in posts[split]]
    assert len(ids) == len(set(ids))


def test_image_paths_are_relative_and_exist(
    builds: dict[str, tuple[Path, Manifest]], posts: dict[str, list[dict]]
) -> None:
    folder, _ = builds["a"]
    for post in (post for split in SPLITS for post in posts[split]):
        is_meme = source_of(post) == "memes"
        assert len(post["images"]) == (1 if is_meme else 0), post["post_id"]
        for path in post["images"]:
            assert not Path(path).is_absolute()
            assert (folder / path).is_file(), path


def test_memes_are_image_posts_and_keep_their_upstream_split(
    posts: dict[str, list[dict]],
) -> None:
    for split in SPLITS:
        annotation = SHARED / MEMES_DIR / "annotations" / f"{split}.jsonl"
        upstream = {
            f"memes:{json.loads(line)['id']}" for line in annotation.read_text().splitlines()
        }
        memes = [post for post in posts[split] if source_of(post) == "memes"]
        assert memes, split
        assert {post["post_id"] for post in memes} <= upstream
        assert all(post["ocr_text"] and not post["title"] for post in memes)


def test_categories_and_sources(builds: dict[str, tuple[Path, Manifest]]) -> None:
    _, manifest = builds["a"]
    assert len(manifest.categories) >= 5
    used = {source.name for source in manifest.sources if source.rows_used}
    assert len(used) >= 4 and "memes" in used
    for category in manifest.categories:
        for split in ("train", "test"):
            counts = manifest.splits[split].categories[category]
            assert 0 < counts.positive < counts.annotated, (category, split)


def test_same_seed_is_byte_identical(builds: dict[str, tuple[Path, Manifest]]) -> None:
    (first, _), (second, _) = builds["a"], builds["b"]
    for name in OUTPUTS:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_another_seed_gives_another_split(builds: dict[str, tuple[Path, Manifest]]) -> None:
    (first, _), (other, _) = builds["a"], builds["other_seed"]
    for split in SPLITS:
        ids = {post["post_id"] for post in read_split(first, split)}
        assert ids != {post["post_id"] for post in read_split(other, split)}, split


def test_manifest_matches_the_files(
    builds: dict[str, tuple[Path, Manifest]], posts: dict[str, list[dict]]
) -> None:
    folder, manifest = builds["a"]
    assert Manifest.model_validate_json((folder / "manifest.json").read_text()) == manifest
    for split, summary in manifest.splits.items():
        data = (folder / summary.file).read_bytes()
        assert summary.sha256 == hashlib.sha256(data).hexdigest()
        assert summary.posts == len(posts[split])
        for category, counts in summary.categories.items():
            labels = [post["labels"][category] for post in posts[split]]
            assert counts.annotated == sum(label != -1 for label in labels)
            assert counts.positive == labels.count(1)
    for source in manifest.sources:
        assert source.rows_used == min(CAP, source.rows_kept)
        in_files = sum(manifest.splits[split].sources[source.name] for split in SPLITS)
        assert in_files == source.rows_used


def test_every_source_row_is_read(builds: dict[str, tuple[Path, Manifest]]) -> None:
    """The quirks of the data README: OLID CRLF + broken UTF-8, SMS header, 5 YouTube CSVs."""
    _, manifest = builds["a"]
    rows = {source.name: source.rows_read for source in manifest.sources}
    assert rows == {
        "jigsaw": 5000,
        "davidson": 24783,
        "ethos": 998,
        "olid": 13240,
        "sms": 5574,
        "youtube": 1956,
        "memes": 950,
    }


def test_command_line_builds_and_refuses_bad_fractions(tmp_path: Path) -> None:
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED}")
    args = ["--shared", str(SHARED), "--out", str(tmp_path), "--max-per-source", "10"]
    assert main(args) == 0
    assert all((tmp_path / name).is_file() for name in OUTPUTS)
    with pytest.raises(SystemExit):
        main([*args, "--val-frac", "0.5", "--test-frac", "0.5"])


def test_allocate_is_proportional_and_exact() -> None:
    sizes = {("", "a"): 90, ("", "b"): 9, ("", "c"): 1}
    assert allocate(sizes, 10) == {("", "a"): 9, ("", "b"): 1, ("", "c"): 0}
    assert allocate(sizes, 500) == sizes
    assert sum(allocate({("", str(n)): n for n in range(1, 30)}, 77).values()) == 77


def test_text_cleaning(tmp_path: Path) -> None:
    broken = tmp_path / "broken.tsv"
    broken.write_bytes(b"ok \xf0\x9f\x98\r\nnext\r\n")
    assert decode_file(broken).splitlines() == ["ok \ufffd", "next"]
    assert clean_text("  a \t b\n\nc &amp; d\x00 ") == "a b c & d"
    assert clean_text("TOP\n\n  line \nBOTTOM ", keep_lines=True) == "TOP\nline\nBOTTOM"
