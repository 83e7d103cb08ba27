"""Teacher scoring: every expert scores every record; labels kept; resumable output."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import app.data.records as records_module
from app.data.records import PostDataset, load_records
from app.model.config import HeadConfig
from app.model.router import Router
from app.model.store import load_router, new_router, save_router
from app.model.tiny import make_tiny_router
from app.model.tiny_encoders import (
    TINY_IMAGE_SIZE,
    TINY_LORA,
    dual_encoder_router_config,
    make_tiny_image_encoder_weights,
    make_tiny_text_encoder_dir,
)
from app.training.teach import TeachError, load_experts, teach

BATCH = 2


@pytest.fixture(scope="module")
def experts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two K = 1 experts, for lqc and rcs (different seeds, so different scores)."""
    root = tmp_path_factory.mktemp("experts")
    return {
        name: make_tiny_router(root / name, categories=(name,), seed=seed)
        for name, seed in (("lqc", 1), ("rcs", 2))
    }


@pytest.fixture
def data(tmp_path: Path, make_images) -> Path:
    """Five posts labelled for lqc, rcs or fe (fe has no expert), some with teacher values."""
    for index, image in enumerate(make_images(2)):
        image.save(tmp_path / f"{index}.png")
    lines = [
        {"post_id": "p1", "title": "buy followers", "images": ["0.png"], "labels": {"lqc": 1}},
        {"post_id": "p2", "ocr_text": "free money", "labels": {"rcs": 0},
         "teacher": {"fe": 0.25, "lqc": 0.99}},
        {"labels": {"fe": 1}, "post_id": "p3", "images": ["1.png", "0.png"], "title": "ünïcode"},
        {"post_id": "p4", "labels": {"lqc": -1, "rcs": 1}},
        {"post_id": "p5", "title": "dance", "images": ["1.png"], "labels": {}},
    ]  # fmt: skip
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def run(experts: dict[str, Path], data: Path, out: Path, **kwargs):
    kwargs.setdefault("batch_size", BATCH)
    return teach(list(experts.values()), data, out, progress=False, **kwargs)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_teacher_values_are_the_experts_probabilities(experts, data: Path, tmp_path) -> None:
    out = tmp_path / "out" / "teach.jsonl"
    stats = run(experts, data, out)
    assert (stats.records, stats.resumed, stats.scored, stats.skipped) == (5, 0, 5, 0)
    assert stats.categories == ("lqc", "rcs") and stats.posts_per_s > 0

    inputs, outputs = read_jsonl(data), read_jsonl(out)
    assert [line["post_id"] for line in outputs] == ["p1", "p2", "p3", "p4", "p5"]
    records = load_records(data, ("lqc", "rcs", "fe")).records
    posts = [post for post, _, _ in PostDataset(records, ("lqc", "rcs", "fe"))]
    for name, store in experts.items():
        expert = load_router(store)
        # Scored in the same batches as teach, so the comparison is exact to float32 rounding.
        expected = torch.cat(
            [expert.predict_proba(posts[i : i + BATCH]) for i in range(0, 5, BATCH)]
        )[:, 0]
        got = torch.tensor([line["teacher"][name] for line in outputs], dtype=torch.float64)
        torch.testing.assert_close(got, expected.double(), atol=1e-6, rtol=0)

    for before, after in zip(inputs, outputs, strict=True):
        old_teacher = before.pop("teacher", {})
        teacher = after["teacher"]
        rest = {key: value for key, value in after.items() if key != "teacher"}
        # Image paths are rewritten relative to the output file: the same files.
        old_images = [(data.parent / p).resolve() for p in before.pop("images", [])]
        new_images = [(out.parent / p).resolve() for p in rest.pop("images", [])]
        assert new_images == old_images
        assert rest == before and list(rest) == list(before)  # labels etc. untouched, in order
        assert set(teacher) == {"lqc", "rcs"} | set(old_teacher)
    assert outputs[1]["teacher"]["fe"] == 0.25  # another category's teacher value kept
    assert outputs[1]["teacher"]["lqc"] != 0.99  # the expert's score replaces the old one
    assert outputs[2]["title"] == "ünïcode"


@pytest.mark.parametrize("cut", ["line", "mid-line"])
def test_resume_gives_the_same_file_as_an_uninterrupted_run(
    experts, data: Path, tmp_path, cut: str
) -> None:
    whole = tmp_path / "whole.jsonl"
    run(experts, data, whole)
    expected = whole.read_bytes()

    partial = tmp_path / "partial.jsonl"
    lines = expected.splitlines(keepends=True)
    kept = b"".join(lines[:3]) + (lines[3][:20] if cut == "mid-line" else b"")
    partial.write_bytes(kept)  # a run stopped after 3 lines (and part of the 4th)
    stats = run(experts, data, partial)
    assert partial.read_bytes() == expected
    # Restarted at the last whole batch (2 posts), so every post is scored in the same batch.
    assert (stats.resumed, stats.scored) == (2, 3)

    stats = run(experts, data, partial)  # already complete: nothing to do
    assert (stats.resumed, stats.scored) == (5, 0)
    assert partial.read_bytes() == expected


def test_resume_refuses_output_of_other_data(experts, data: Path, tmp_path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"post_id": "other", "teacher": {"lqc": 0.5, "rcs": 0.5}}) + "\n")
    with pytest.raises(TeachError, match=r"out.jsonl:1: post_id 'other', but record 1 .* 'p1'"):
        run(experts, data, out)
    out.write_text(json.dumps({"post_id": "p1", "teacher": {"lqc": 0.5}}) + "\n")
    with pytest.raises(TeachError, match="no teacher value for rcs: written by other experts"):
        run(experts, data, out)
    run(experts, data, out, resume=False)  # starts afresh
    assert len(read_jsonl(out)) == 5


def test_experts_must_be_single_category_and_distinct(
    experts, data: Path, tmp_path, tiny_store: Path
) -> None:
    out = tmp_path / "out.jsonl"
    with pytest.raises(TeachError, match=r"already has an expert"):
        teach([experts["lqc"], experts["lqc"]], data, out, progress=False)
    with pytest.raises(TeachError, match=r"an expert scores one category, .* has 3"):
        teach([tiny_store], data, out, progress=False)
    with pytest.raises(TeachError, match="would overwrite the input"):
        teach([experts["lqc"]], data, data, progress=False)
    assert not out.exists()


def test_skip_bad_leaves_bad_lines_out(experts, data: Path, tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    shutil.copy(data, bad)
    with bad.open("a") as handle:
        handle.write('{"post_id": "p6", "images": ["missing.png"]}\n')
    out = tmp_path / "out.jsonl"
    stats = teach([experts["rcs"]], bad, out, progress=False, skip_bad=True)
    assert (stats.records, stats.skipped) == (5, 1)
    assert [line["post_id"] for line in read_jsonl(out)] == ["p1", "p2", "p3", "p4", "p5"]


@pytest.fixture(scope="module")
def shared_backbone_experts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three tiny dual-encoder experts, as `radar train-expert` makes them from one config:
    a and b on the same backbone files and settings (one input builder), c with another
    max_text_tokens (another input builder). Given in the order a, c, b."""
    root = tmp_path_factory.mktemp("shared")
    text = make_tiny_text_encoder_dir(root / "text")
    image = make_tiny_image_encoder_weights(root / "image.safetensors")
    stores = {}
    for seed, (name, max_tokens) in enumerate((("a", 64), ("c", 32), ("b", 64))):
        config = dual_encoder_router_config(
            (name,),
            path=str(text),
            image_path=str(image),
            image_size=TINY_IMAGE_SIZE,
            max_text_tokens=max_tokens,
            lora=TINY_LORA,
            head=HeadConfig(hidden_dims=(8,)),
        )
        torch.manual_seed(seed)
        stores[name] = save_router(new_router(config, root / name), root / name)
    return stores


def test_each_post_is_decoded_and_its_inputs_built_once_per_input_builder(
    shared_backbone_experts: dict[str, Path], data: Path, tmp_path, monkeypatch
) -> None:
    decodes: list[Path] = []
    builds: list[int] = []
    real_decode, real_build = records_module.decode_rgb, Router.build_inputs

    def counting_decode(source, *args, **kwargs):
        decodes.append(Path(source))
        return real_decode(source, *args, **kwargs)

    def counting_build(self, posts):
        builds.append(len(posts))
        return real_build(self, posts)

    monkeypatch.setattr(records_module, "decode_rgb", counting_decode)
    monkeypatch.setattr(Router, "build_inputs", counting_build)
    out = tmp_path / "out.jsonl"
    stats = run(shared_backbone_experts, data, out)

    assert stats.categories == ("a", "c", "b")  # the order given, whatever the grouping
    assert len(decodes) == 4  # p1, p3 (two) and p5's images, each once for all experts
    # 3 batches (2 + 2 + 1 posts) × 2 input builders: {a, b} share one, c has its own.
    # Building per expert, as before, would make 9.
    assert sorted(builds) == [1, 1, 2, 2, 2, 2]

    monkeypatch.undo()
    outputs = read_jsonl(out)
    assert list(outputs[0]["teacher"]) == ["a", "c", "b"]
    records = load_records(data, ("lqc", "rcs", "fe")).records
    posts = [post for post, _, _ in PostDataset(records, ("lqc", "rcs", "fe"))]
    for name, store in shared_backbone_experts.items():
        expert = load_router(store)
        expected = torch.cat(
            [expert.predict_proba(posts[i : i + BATCH]) for i in range(0, 5, BATCH)]
        )[:, 0]
        got = torch.tensor([line["teacher"][name] for line in outputs])
        assert torch.equal(got, expected)  # the shared inputs are the expert's own, exactly


def test_experts_group_by_input_builder(shared_backbone_experts: dict[str, Path]) -> None:
    experts = load_experts(list(shared_backbone_experts.values()), "cpu")
    assert [tuple(group.experts) for group in experts.groups] == [("a", "b"), ("c",)]
