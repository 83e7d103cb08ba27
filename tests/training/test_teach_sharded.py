"""Teach, evaluate and calibrate sharded over processes: the output of one process.

The fast tests play the processes of a launch one after the other in this process (the one
collective, teach's start barrier, answered in place), which covers the part files, their
resume and the merge. The slow test launches 2 CPU processes with `accelerate launch`.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import app.training.teach as teach_module
from app.data.sharding import Shard, ShardDone, spans
from app.model.tiny import make_tiny_router
from app.training.teach import TeachError, parts_dir, teach
from tests.conftest import random_images

REPO = Path(__file__).resolve().parents[2]
CATEGORIES = ("lqc", "rcs", "fe")
N_RECORDS = 20
BATCH = 3  # 7 batches: rank 0 gets 3 (records 0-8), rank 1 gets 4 (9-19, the last partial)


def write_data(directory: Path) -> Path:
    """20 posts, every one labelled for every category (enough positives to calibrate)."""
    directory.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(random_images(3)):
        image.save(directory / f"{index}.png")
    path = directory / "data.jsonl"
    with path.open("w") as handle:
        for i in range(N_RECORDS):
            record = {
                "post_id": f"p{i}",
                "title": f"buy followers now {i}" if i % 2 else f"my cat video {i}",
                "images": [f"{i % 3}.png"] if i % 4 else [],
                "labels": {c: (i + k) % 2 for k, c in enumerate(CATEGORIES)},
            }
            handle.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="module")
def experts(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two K = 1 experts for the slow test; the fast ones take the first alone (half the time)."""
    root = tmp_path_factory.mktemp("experts")
    return [
        make_tiny_router(root / c, categories=(c,), seed=s) for s, c in enumerate(CATEGORIES[:2])
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def expected(experts: list[Path], data: Path) -> bytes:
    """What one process writes with the first expert (in the folder of `out_path`)."""
    out = data.parent / "out" / "expected.jsonl"
    alone(experts, data, out)
    return out.read_bytes()


@pytest.fixture
def in_place_barrier(monkeypatch: pytest.MonkeyPatch) -> None:
    """Teach's start barrier answered as if every process had shown the same view."""
    monkeypatch.setattr(
        teach_module, "gather_in_rank_order", lambda shard, value, cpu: [value] * shard.world
    )


def out_path(data: Path, name: str) -> Path:
    """A fresh output beside `expected`'s, so that its relative image paths are the same."""
    path = data.parent / "out" / name
    path.unlink(missing_ok=True)
    shutil.rmtree(parts_dir(path), ignore_errors=True)
    return path


def alone(experts: list[Path], data: Path, out: Path, **kwargs):
    """One process, with the first expert."""
    return teach(experts[:1], data, out, **({"batch_size": BATCH, "progress": False} | kwargs))


def shard_run(experts: list[Path], data: Path, out: Path, rank: int, **kwargs):
    """Process `rank` of 2, with the first expert: its part (the main process also merges)."""
    return alone(experts, data, out, shard=Shard(rank, 2), **kwargs)


def test_spans_tile_the_records_on_whole_batches() -> None:
    assert spans(20, 3, 2) == [range(0, 9), range(9, 20)]
    assert spans(20, 3, 1) == [range(0, 20)]
    assert spans(2, 4, 3) == [range(0, 0), range(0, 0), range(0, 2)]
    for n, batch, world in ((20, 3, 2), (7, 2, 4), (100, 32, 3), (1, 1, 1)):
        parts = spans(n, batch, world)
        assert [i for part in parts for i in part] == list(range(n))
        assert all(part.start % batch == 0 for part in parts)


@pytest.mark.usefixtures("in_place_barrier")
def test_sharded_parts_merge_into_the_single_process_output(experts, data, expected) -> None:
    out = out_path(data, "merged.jsonl")
    with pytest.raises(ShardDone):
        shard_run(experts, data, out, rank=1)  # a worker writes its part, then ends
    assert not out.exists() and (parts_dir(out) / "000000009-000000020.jsonl").is_file()
    stats = shard_run(experts, data, out, rank=0)  # the main process: its part, the merge
    assert (stats.records, stats.resumed, stats.scored, stats.processes) == (20, 0, 9, 2)
    assert out.read_bytes() == expected
    assert not parts_dir(out).exists()

    stats = shard_run(experts, data, out, rank=0)  # finished: a rerun changes nothing
    assert (stats.resumed, stats.scored) == (9, 0)
    stats = alone(experts, data, out)  # nor does one alone
    assert (stats.resumed, stats.scored) == (20, 0)
    assert out.read_bytes() == expected


@pytest.mark.usefixtures("in_place_barrier")
def test_interrupted_parts_resume_on_their_own(experts, data, expected) -> None:
    lines = expected.splitlines(keepends=True)
    out = out_path(data, "resumed.jsonl")
    folder = parts_dir(out)
    folder.mkdir()
    # Rank 1 stopped after 4 lines and part of a 5th; rank 0 finished but was not merged.
    (folder / "000000009-000000020.partial").write_bytes(b"".join(lines[9:13]) + lines[13][:15])
    (folder / "000000000-000000009.jsonl").write_bytes(b"".join(lines[:9]))

    with pytest.raises(TeachError, match="parts of a run sharded"):
        alone(experts, data, out)  # one process cannot resume them
    with pytest.raises(ShardDone):
        shard_run(experts, data, out, rank=1)  # redoes its last partial batch, 12-19
    stats = shard_run(experts, data, out, rank=0)
    assert (stats.resumed, stats.scored) == (9, 0)
    assert out.read_bytes() == expected


@pytest.mark.usefixtures("in_place_barrier")
def test_parts_of_another_sharding_are_not_resumed(experts, data) -> None:
    out = out_path(data, "other.jsonl")
    with pytest.raises(ShardDone):
        shard_run(experts, data, out, rank=1)
    with pytest.raises(TeachError, match="another number of processes or batch size"):
        shard_run(experts, data, out, rank=0, batch_size=4)
    with pytest.raises(ShardDone):  # afresh, they go
        shard_run(experts, data, out, rank=1, batch_size=4, resume=False)
    shard_run(experts, data, out, rank=0, batch_size=4, resume=False)
    assert [json.loads(line)["post_id"] for line in out.read_text().splitlines()] == [
        f"p{i}" for i in range(N_RECORDS)
    ]

    partial = out_path(data, "partial.jsonl")
    partial.write_bytes(out.read_bytes().splitlines(keepends=True)[0])
    with pytest.raises(TeachError, match="a partial output of one process"):
        shard_run(experts, data, partial, rank=0)


@pytest.mark.slow
def test_two_processes_write_what_one_writes(experts, tiny_store, tmp_path) -> None:
    """`accelerate launch` with 2 CPU processes against one process: teach's bytes, the
    scores of score_data, evaluate's metrics and calibrate's taus."""
    data = write_data(tmp_path / "data")
    results = {}
    for processes in (1, 2):
        out = tmp_path / f"run{processes}"
        probe = ["-m", "tests.training.sharded_probe", str(out), str(data), str(tiny_store)]
        probe += [str(BATCH), *map(str, experts)]
        if processes == 1:
            command = [sys.executable, *probe]
        else:
            launcher = Path(sys.executable).with_name("accelerate")
            config = REPO / "deploy" / "accelerate" / "ddp_cpu_2proc.yaml"
            command = [str(launcher), "launch", "--config_file", str(config), *probe]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count("report written to") == 1  # the main process alone
        assert not parts_dir(out / "teach.jsonl").exists()
        results[processes] = out

    one, two = results[1], results[2]
    assert (two / "teach.jsonl").read_bytes() == (one / "teach.jsonl").read_bytes()
    np.testing.assert_allclose(
        np.load(two / "scores.npy"), np.load(one / "scores.npy"), atol=1e-6, rtol=0
    )
    metrics = [json.loads((r / "eval" / "report.json").read_text())["metrics"] for r in (one, two)]
    assert metrics[0].keys() == metrics[1].keys()
    np.testing.assert_allclose(_numbers(metrics[1]), _numbers(metrics[0]), atol=1e-6, rtol=0)
    taus = [
        {c: v["tau"] for c, v in yaml.safe_load((r / "t.yaml").read_text())["categories"].items()}
        for r in (one, two)
    ]
    assert taus[0] == taus[1] and any(tau > 0 for tau in taus[0].values())


def _numbers(value) -> list[float]:
    """Every number in a JSON document, in document order (None as NaN)."""
    if isinstance(value, dict):
        return [x for key in sorted(value) for x in _numbers(value[key])]
    if isinstance(value, list):
        return [x for item in value for x in _numbers(item)]
    if value is None:
        return [float("nan")]
    return [float(value)] if isinstance(value, int | float) else []
