"""Training data: line-by-line validation with file:line:field errors, matrices, collation."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from app.data.records import (
    DataError,
    PostDataset,
    filter_annotated,
    fingerprint,
    label_matrix,
    load_records,
    make_collate,
    teacher_matrix,
)
from app.model.post import Post
from app.model.store import load_router

CATEGORIES = ("lqc", "rcs", "fe")


def write_jsonl(path: Path, lines: list[dict | str | bytes]) -> Path:
    """One line per item: dicts as JSON, strings and bytes as written."""
    with path.open("wb") as handle:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            handle.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return path


@pytest.fixture
def data_dir(tmp_path: Path, make_images) -> Path:
    """`data.jsonl` with three posts; image paths relative to its directory."""
    (tmp_path / "img").mkdir()
    rgb, wide = make_images(2)
    rgb.save(tmp_path / "img" / "a.png")
    wide.convert("L").save(tmp_path / "img" / "gray.png")  # decoded to RGB on load
    write_jsonl(
        tmp_path / "data.jsonl",
        [
            {"post_id": "p1", "title": "cheap followers", "images": ["img/a.png"],
             "labels": {"lqc": 1}},
            {"post_id": "p2", "ocr_text": "free money", "labels": {"rcs": 0, "fe": -1},
             "teacher": {"lqc": 0.25}},
            {"post_id": "p3", "images": ["img/gray.png", "img/a.png"],
             "labels": {"lqc": 0, "fe": 1}, "teacher": {"lqc": 0.5, "fe": 1}},
        ],
    )  # fmt: skip
    return tmp_path


def test_valid_file_loads_with_images_relative_to_the_file(data_dir: Path, monkeypatch) -> None:
    monkeypatch.chdir(data_dir.parent)  # relative to the JSONL file, not the working directory
    loaded = load_records(data_dir / "data.jsonl", CATEGORIES)
    assert [item.record.post_id for item in loaded] == ["p1", "p2", "p3"]
    assert [item.line for item in loaded] == [1, 2, 3]
    assert loaded.skipped == 0 and loaded.errors == ()
    assert loaded[2].image_paths == (data_dir / "img" / "gray.png", data_dir / "img" / "a.png")
    assert loaded[0].record.title == "cheap followers"


def test_absolute_image_paths_are_kept(data_dir: Path, tmp_path_factory) -> None:
    other = tmp_path_factory.mktemp("elsewhere")
    image = (data_dir / "img" / "a.png").absolute()
    path = write_jsonl(other / "d.jsonl", [{"post_id": "p", "images": [str(image)]}])
    assert load_records(path, CATEGORIES)[0].image_paths == (image,)


def test_missing_category_is_not_annotated_and_teacher_is_nan(data_dir: Path) -> None:
    loaded = load_records(data_dir / "data.jsonl", CATEGORIES)
    labels = label_matrix(loaded.records, CATEGORIES)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, [[1, -1, -1], [-1, 0, -1], [0, -1, 1]])
    teacher = teacher_matrix(loaded.records, CATEGORIES)
    expected = [[np.nan] * 3, [0.25, np.nan, np.nan], [0.5, np.nan, 1.0]]
    np.testing.assert_array_equal(teacher, np.array(expected, dtype=np.float32))


GOOD = {"post_id": "ok", "labels": {"lqc": 0}}
BAD_LINES = [
    pytest.param("{not json", "<line>", "not valid JSON", id="json"),
    pytest.param(b"\xff\xfe", "<line>", "not UTF-8", id="utf8"),
    pytest.param("[1, 2]", "<line>", "not a JSON object", id="not-object"),
    pytest.param({"title": "x"}, "post_id", "missing", id="no-post-id"),
    pytest.param({"post_id": ""}, "post_id", "at least 1", id="empty-post-id"),
    pytest.param({"post_id": 7}, "post_id", "string", id="int-post-id"),
    pytest.param({"post_id": "a", "tittle": "x"}, "tittle", "unknown field", id="extra"),
    pytest.param({"post_id": "a", "labels": {"lqc": 2}}, "labels.lqc", "must be -1", id="2"),
    pytest.param({"post_id": "a", "labels": {"lqc": True}}, "labels.lqc", "got True", id="bool"),
    pytest.param({"post_id": "a", "labels": {"lqc": 1.0}}, "labels.lqc", "got 1.0", id="float"),
    pytest.param({"post_id": "a", "labels": ["lqc"]}, "labels", "dictionary", id="list"),
    pytest.param({"post_id": "a", "teacher": {"fe": 1.5}}, "teacher.fe", "[0, 1]", id="t>1"),
    pytest.param({"post_id": "a", "teacher": {"fe": "0.5"}}, "teacher.fe", "[0, 1]", id="t-str"),
    pytest.param({"post_id": "a", "images": [3]}, "images[0]", "string", id="image-int"),
    pytest.param({"post_id": "a", "images": ["nope.png"]}, "images[0]", "no such file", id="gone"),
    pytest.param({"post_id": "a", "labels": {"xyz": 1}}, "labels.xyz", "unknown category", id="c"),
    pytest.param({"post_id": "a", "teacher": {"xyz": 0.1}}, "teacher.xyz", "unknown category"),
    pytest.param({"post_id": "ok"}, "post_id", "duplicate of line 1", id="duplicate"),
]


@pytest.mark.parametrize(("line", "field", "problem"), BAD_LINES)
def test_bad_line_names_file_line_and_field(tmp_path: Path, line, field, problem) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, "", line])  # a blank line still counts
    with pytest.raises(DataError) as caught:
        load_records(path, CATEGORIES)
    message = str(caught.value)
    assert message.startswith(f"{path}:3: {field}: "), message
    assert problem in message
    assert (caught.value.line, caught.value.field) == (3, field)


def test_skip_bad_skips_and_counts(tmp_path: Path) -> None:
    lines = [GOOD, "{", {"post_id": "a", "labels": {"x": 1}}, {"post_id": "b"}, GOOD]
    loaded = load_records(write_jsonl(tmp_path / "d.jsonl", lines), CATEGORIES, skip_bad=True)
    assert [(item.record.post_id, item.line) for item in loaded] == [("ok", 1), ("b", 4)]
    assert loaded.skipped == 3
    assert [message.split(": ")[1] for message in loaded.errors] == [
        "<line>",
        "labels.x",
        "post_id",
    ]


def test_file_without_usable_records_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no usable records \(1 bad lines skipped\)"):
        load_records(write_jsonl(tmp_path / "d.jsonl", ["", "{"]), CATEGORIES, skip_bad=True)
    with pytest.raises(DataError, match="cannot read"):
        load_records(tmp_path / "absent.jsonl", CATEGORIES)


def test_other_categories_allowed_on_request_and_max_images(data_dir: Path) -> None:
    path = data_dir / "data.jsonl"
    loaded = load_records(path, ("lqc",), allow_other_categories=True)
    np.testing.assert_array_equal(label_matrix(loaded.records, ("lqc",)), [[1], [-1], [0]])
    with pytest.raises(DataError, match=r"data.jsonl:2: labels.rcs: unknown category"):
        load_records(path, ("lqc",))
    with pytest.raises(DataError, match=r"data.jsonl:3: images: 2 images; .* at most 1"):
        load_records(path, CATEGORIES, max_images=1)


def test_filter_annotated_keeps_only_that_category(data_dir: Path) -> None:
    records = load_records(data_dir / "data.jsonl", CATEGORIES).records
    assert [item.record.post_id for item in filter_annotated(records, "lqc")] == ["p1", "p3"]
    assert [item.record.post_id for item in filter_annotated(records, "rcs")] == ["p2"]
    with pytest.raises(DataError, match=r"labels\.nsfw: no record is annotated"):
        filter_annotated(records, "nsfw")


def test_dataset_items(data_dir: Path) -> None:
    dataset = PostDataset(load_records(data_dir / "data.jsonl", CATEGORIES).records, CATEGORIES)
    assert len(dataset) == 3
    post, labels, teacher = dataset[2]
    assert isinstance(post, Post) and post.title == "" and len(post.images) == 2
    assert [image.mode for image in post.images] == ["RGB", "RGB"]
    with Image.open(data_dir / "img" / "a.png") as original:
        assert post.images[1].size == original.size
    assert labels.dtype == torch.long and labels.tolist() == [0, -1, 1]
    assert teacher.dtype == torch.float32 and torch.isnan(teacher[1])
    assert teacher[[0, 2]].tolist() == [0.5, 1.0]


def test_undecodable_image_names_the_line_and_field(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, {"post_id": "b", "images": ["broken.png"]}])
    dataset = PostDataset(load_records(path, CATEGORIES).records, CATEGORIES)
    with pytest.raises(DataError, match=r"d.jsonl:2: images\[0\]: not an image"):
        dataset[1]


def test_collate_uses_the_routers_input_builder(data_dir: Path, tiny_store: Path) -> None:
    router = load_router(tiny_store)
    records = load_records(data_dir / "data.jsonl", router.categories).records
    dataset = PostDataset(records, router.categories)
    collate = make_collate(router)
    batch = next(iter(DataLoader(dataset, batch_size=3, collate_fn=collate)))

    expected = router.build_inputs([dataset[index][0] for index in range(3)])
    assert batch["inputs"].keys() == expected.keys()
    assert "pixel_values" in expected
    for name, tensor in expected.items():
        assert torch.equal(batch["inputs"][name], tensor), name
    assert batch["labels"].dtype == torch.long
    assert batch["labels"].tolist() == [[1, -1, -1], [-1, 0, -1], [0, -1, 1]]
    assert batch["teacher_mask"].tolist() == [
        [False] * 3,
        [True, False, False],
        [True, False, True],
    ]
    assert batch["teacher"].shape == (3, 3)
    assert batch["teacher"][batch["teacher_mask"]].tolist() == [0.25, 0.5, 1.0]
    assert torch.isnan(batch["teacher"][~batch["teacher_mask"]]).all()

    # DataLoader workers receive the collate_fn pickled.
    clone = pickle.loads(pickle.dumps(collate))  # noqa: S301 (our own object)
    again = clone([dataset[index] for index in range(3)])
    for name, tensor in expected.items():
        assert torch.equal(again["inputs"][name], tensor), name


def test_fingerprint_covers_the_jsonl_and_its_images(data_dir: Path, make_images) -> None:
    path = data_dir / "data.jsonl"
    first = fingerprint([path])
    assert first.startswith("sha256:") and len(first) == len("sha256:") + 64
    assert fingerprint([path]) == first

    image = data_dir / "img" / "a.png"
    original = image.read_bytes()
    with Image.open(image) as decoded:
        size = decoded.size
    make_images(1, seed=5)[0].resize(size).save(image)
    changed = fingerprint([path])
    assert changed != first
    image.write_bytes(original)
    assert fingerprint([path]) == first

    with path.open("a") as handle:
        handle.write(json.dumps({"post_id": "p4"}) + "\n")
    assert fingerprint([path]) not in (first, changed)
