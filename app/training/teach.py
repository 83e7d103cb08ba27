"""Teacher scoring (`radar teach`): every expert scores every record, written as `teacher`.

DESIGN.md, "Training objective": a per-category expert E_k scores *every* training sample,
including those annotated only for other categories; `t_k = E_k(x)` feeds L_distill. The
output is the input JSONL with each line's `teacher` merged with the experts' probabilities
(other categories' teacher values and all labels untouched).

The output is written batch by batch and flushed, so an interrupted run resumes where it
stopped: the lines already written must be the input's first records, in order.
"""

import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from tqdm import tqdm

from app.data.records import LoadedRecord, load_post, load_records
from app.model.router import Router
from app.model.store import load_router


class TeachError(Exception):
    """The experts or the output file cannot be used as asked."""


@dataclass(frozen=True)
class TeachStats:
    """What one `teach` run did."""

    records: int  # usable records in the data (= lines of the finished output)
    resumed: int  # records found already scored in the output
    scored: int  # records scored by this run
    skipped: int  # bad lines left out (skip_bad)
    categories: tuple[str, ...]  # the experts' categories, in the order given
    seconds: float
    posts_per_s: float  # scored / seconds


def teach(
    expert_dirs: Sequence[Path],
    data: Path,
    out: Path,
    *,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    resume: bool = True,
    progress: bool = True,
    skip_bad: bool = False,
) -> TeachStats:
    """Score every record of `data` with every expert (a K = 1 router) and write `out`.

    With `resume` and an existing `out`, continue after the records it already holds (a
    mismatch with `data` is a `TeachError`); without, start `out` afresh. With `skip_bad`,
    bad input lines are left out of `out` (and counted) instead of stopping the run.
    """
    data, out = Path(data), Path(out)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if out.resolve() == data.resolve():
        raise TeachError(f"{out}: the output would overwrite the input data")
    experts = load_experts(expert_dirs, device)
    max_images = min(expert.config.backbone.max_images for expert in experts.values())
    loaded = load_records(
        data, tuple(experts), skip_bad=skip_bad, max_images=max_images, allow_other_categories=True
    )
    records = loaded.records
    done = resume_point(out, records, tuple(experts), batch_size) if resume else 0
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with (
        out.open("ab" if resume else "wb") as handle,
        tqdm(
            total=len(records), initial=done, unit="post", desc="teach", disable=not progress
        ) as bar,
    ):
        for batch in _batches(records, done, batch_size):
            handle.write(score_batch(experts, batch, out.parent))
            handle.flush()  # a crash loses at most the batch in flight
            bar.update(len(batch))
        os.fsync(handle.fileno())
    seconds = time.perf_counter() - start
    scored = len(records) - done
    return TeachStats(
        len(records),
        done,
        scored,
        loaded.skipped,
        tuple(experts),
        seconds,
        scored / max(seconds, 1e-9),
    )


def load_experts(expert_dirs: Sequence[Path], device: torch.device | str) -> dict[str, Router]:
    """Load each expert (eval mode, on `device`), keyed by its one category."""
    if not expert_dirs:
        raise TeachError("no experts given")
    experts: dict[str, Router] = {}
    origin: dict[str, Path] = {}
    for expert_dir in map(Path, expert_dirs):
        router = load_router(expert_dir, device)
        if len(router.categories) != 1:
            raise TeachError(
                f"{expert_dir}: an expert scores one category, this router has "
                f"{len(router.categories)} ({', '.join(router.categories)})"
            )
        (category,) = router.categories
        if category in experts:
            raise TeachError(
                f"{expert_dir}: category {category!r} already has an expert ({origin[category]})"
            )
        experts[category], origin[category] = router, expert_dir
    return experts


def score_batch(experts: dict[str, Router], batch: Sequence[LoadedRecord], out_dir: Path) -> bytes:
    """The output lines of `batch`: each input line with its `teacher` merged.

    Relative image paths are rewritten relative to `out_dir`, where the output file lives, so
    they still point at the same files.
    """
    posts = [load_post(item) for item in batch]
    scores = {name: expert.predict_proba(posts)[:, 0].tolist() for name, expert in experts.items()}
    lines = []
    for row, item in enumerate(batch):
        # Re-parse the line as written (not the validated model) so every other field stays
        # exactly what the user wrote, key order included.
        fields = json.loads(item.raw)
        teacher = dict(fields.get("teacher") or {})
        teacher.update({name: values[row] for name, values in scores.items()})
        fields["teacher"] = teacher
        if fields.get("images"):
            fields["images"] = [_relative_to(out_dir, path) for path in item.image_paths]
        lines.append(json.dumps(fields, ensure_ascii=False) + "\n")
    return "".join(lines).encode("utf-8")


def _relative_to(directory: Path, path: Path) -> str:
    return os.path.relpath(path.resolve(), directory.resolve())


def resume_point(
    out: Path, records: Sequence[LoadedRecord], categories: Sequence[str], batch_size: int
) -> int:
    """How many records `out` already holds; trims `out` to exactly those lines.

    The count is rounded down to a whole number of batches: scores depend on the batch they
    were computed in (padding, in the last float bits), so redoing the partial batch makes a
    resumed file identical to an uninterrupted one with the same batch size. A trailing
    partial line (a crash mid-write) is dropped too.
    """
    if not out.exists():
        return 0
    ends = [0]  # byte offset after each complete line
    with out.open("rb") as handle:
        for number, line in enumerate(_complete_lines(handle), start=1):
            if number > len(records):
                raise TeachError(f"{out}: has more lines than the data has records; not resumed")
            _check_line(out, number, line, records[number - 1], categories)
            ends.append(ends[-1] + len(line))
    written = len(ends) - 1
    # Batches start at multiples of batch_size; a complete output ends on one too.
    done = written if written == len(records) else written // batch_size * batch_size
    with out.open("r+b") as handle:
        handle.truncate(ends[done])
    return done


def _complete_lines(handle: BinaryIO) -> Iterator[bytes]:
    for line in handle:
        if line.endswith(b"\n"):
            yield line


def _check_line(
    out: Path, number: int, line: bytes, item: LoadedRecord, categories: Sequence[str]
) -> None:
    hint = "delete it or run without resume"
    try:
        fields = json.loads(line)
        post_id, teacher = fields["post_id"], fields["teacher"]
        if not isinstance(teacher, dict):
            raise TypeError("teacher is not an object")
    except (ValueError, KeyError, TypeError):
        raise TeachError(f"{out}:{number}: not a line teach writes; {hint}") from None
    if post_id != item.record.post_id:
        raise TeachError(
            f"{out}:{number}: post_id {post_id!r}, but record {number} of the data "
            f"({item.source}:{item.line}) is {item.record.post_id!r}: the output belongs to "
            f"other data; {hint}"
        )
    missing = [name for name in categories if name not in teacher]
    if missing:
        raise TeachError(
            f"{out}:{number}: no teacher value for {', '.join(missing)}: written by other "
            f"experts; {hint}"
        )


def _batches(
    records: Sequence[LoadedRecord], start: int, batch_size: int
) -> Iterator[Sequence[LoadedRecord]]:
    for begin in range(start, len(records), batch_size):
        yield records[begin : begin + batch_size]
