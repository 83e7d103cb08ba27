"""Teacher scoring (`radar teach`): every expert scores every record, written as `teacher`.

DESIGN.md, "Training objective": a per-category expert E_k scores *every* training sample,
including those annotated only for other categories; `t_k = E_k(x)` feeds L_distill. The
output is the input JSONL with each line's `teacher` merged with the experts' probabilities
(other categories' teacher values and all labels untouched).

Each post is decoded once per batch, and its inputs built once per batch for every group of
experts whose backbones build identical inputs (`ExpertGroup`): the usual K experts trained
from one backbone config tokenise and preprocess a post once, not K times.

The output is written batch by batch and flushed, so an interrupted run resumes where it
stopped: the lines already written must be the input's first records, in order.

Under `accelerate launch` (several processes, `app.data.sharding`) each process scores its
slice of whole batches into its own part file, `<out>.parts/<first>-<end>.partial`, which
resumes on its own like the output of one process and is renamed `.jsonl` once complete.
The main process waits for every part, concatenates them in input order into `out`
(atomically) and removes the parts: the same bytes as one process writes. A finished output
is left as it is by a rerun, sharded or not.
"""

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from tqdm import tqdm

from app.data.records import LoadedRecord, load_post, load_records
from app.data.sharding import Shard, ShardDone, current_shard, gather_in_rank_order, spans
from app.model.config import resolve_path
from app.model.post import Post
from app.model.router import Router
from app.model.store import load_router

PARTS_SUFFIX = ".parts"  # `<out>.parts/`: the part files of a sharded run
PARTIAL, COMPLETE = ".partial", ".jsonl"  # a part being written, a finished one
WAIT_POLL_S = 0.5  # how often the main process looks for the other processes' parts
WAIT_REPORT_S = 60.0  # how often it says which parts it is still waiting for


class TeachError(Exception):
    """The experts or the output file cannot be used as asked."""


@dataclass(frozen=True)
class TeachStats:
    """What one `teach` run did (`resumed` and `scored`: this process's slice when sharded)."""

    records: int  # usable records in the data (= lines of the finished output)
    resumed: int  # records found already scored in the output
    scored: int  # records scored by this run
    skipped: int  # bad lines left out (skip_bad)
    categories: tuple[str, ...]  # the experts' categories, in the order given
    seconds: float
    posts_per_s: float  # scored / seconds
    processes: int = 1  # processes of the launch that shared the scoring


@dataclass(frozen=True)
class ExpertGroup:
    """Experts whose backbones build identical inputs: `build_inputs` runs once for all.

    The first expert's input builder serves the group; each expert then runs its own forward
    (its own LoRA adapter, MLP and head) on those inputs.
    """

    experts: dict[str, Router]  # category → expert, in the order given

    def probabilities(self, posts: Sequence[Post]) -> dict[str, list[float]]:
        """Each expert's probability for each post, inputs built once.

        Once more with an image-feature cache, when the batch had images it did not hold:
        the first expert's forward has stored them, so built again the batch reads every
        image from the cache and the other experts encode none (each image is encoded once,
        not once per expert). Cached and freshly encoded features are the same floats.
        """
        builder = next(iter(self.experts.values()))
        inputs = builder.build_inputs(posts)
        scores: dict[str, list[float]] = {}
        for name, expert in self.experts.items():
            scores[name] = _probabilities(expert, inputs)
            if len(scores) == 1 < len(self.experts) and _encodes_misses(builder, inputs):
                inputs = builder.build_inputs(posts)
        return scores


def _encodes_misses(builder: Router, inputs: dict[str, torch.Tensor]) -> bool:
    """Inputs of a cached builder that still carry pixels: images the cache lacked."""
    cache = getattr(builder.base_backbone, "feature_cache", None)
    return cache is not None and "pixel_values" in inputs


@dataclass(frozen=True)
class Experts:
    """The loaded experts, grouped by the inputs their backbones build."""

    categories: tuple[str, ...]  # one per expert, in the order given
    groups: tuple[ExpertGroup, ...]

    @property
    def max_images(self) -> int:
        """The most images every expert takes."""
        return min(e.config.backbone.max_images for g in self.groups for e in g.experts.values())

    def probabilities(self, posts: Sequence[Post]) -> dict[str, list[float]]:
        """Each expert's probabilities for `posts`, in the order the experts were given."""
        scores: dict[str, list[float]] = {}
        for group in self.groups:
            scores.update(group.probabilities(posts))
        return {name: scores[name] for name in self.categories}


def _probabilities(expert: Router, inputs: dict[str, torch.Tensor]) -> list[float]:
    """`expert.predict_proba` on inputs built already (eval mode, no autograd)."""
    was_training = expert.training
    expert.eval()
    try:
        with torch.inference_mode():
            return torch.sigmoid(expert(inputs))[:, 0].cpu().tolist()
    finally:
        expert.train(was_training)


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
    shard: Shard | None = None,
    feature_cache: Path | None = None,
) -> TeachStats:
    """Score every record of `data` with every expert (a K = 1 router) and write `out`.

    With `resume` and an existing `out`, continue after the records it already holds (a
    mismatch with `data` is a `TeachError`); without, start `out` afresh. With `skip_bad`,
    bad input lines are left out of `out` (and counted) instead of stopping the run.

    `shard` None reads the launch (`current_shard`). Sharded, every process scores its slice
    into its part file; a process other than the main one then ends (`ShardDone`, exit
    status 0) and the main process merges the parts into `out` (see the module doc).
    """
    data, out = Path(data), Path(out)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if out.resolve() == data.resolve():
        raise TeachError(f"{out}: the output would overwrite the input data")
    shard = current_shard() if shard is None else shard
    experts = load_experts(expert_dirs, shard.device(device), feature_cache)
    loaded = load_records(
        data,
        experts.categories,
        skip_bad=skip_bad,
        max_images=experts.max_images,
        allow_other_categories=True,
    )
    records = loaded.records
    start = time.perf_counter()
    if shard.sharded:
        resumed, scored = _teach_shard(experts, records, out, batch_size, resume, progress, shard)
    else:
        resumed = _resume_alone(out, records, experts.categories, batch_size) if resume else 0
        span = range(resumed, len(records))
        _write_span(experts, records, span, out, batch_size, resume, progress)
        scored = len(span)
    seconds = time.perf_counter() - start
    return TeachStats(
        len(records),
        resumed,
        scored,
        loaded.skipped,
        experts.categories,
        seconds,
        scored / max(seconds, 1e-9),
        shard.world,
    )


def load_experts(
    expert_dirs: Sequence[Path], device: torch.device | str, feature_cache: Path | None = None
) -> Experts:
    """Load each expert (eval mode, on `device`), grouped by the inputs its backbone builds.

    With `feature_cache`, each expert's frozen image encoder reads and fills that directory
    (`Router.use_feature_cache`): the features training stored are not computed again."""
    if not expert_dirs:
        raise TeachError("no experts given")
    groups: dict[str, dict[str, Router]] = {}
    origin: dict[str, Path] = {}
    for expert_dir in map(Path, expert_dirs):
        router = load_router(expert_dir, device)
        router.use_feature_cache(feature_cache)
        if len(router.categories) != 1:
            raise TeachError(
                f"{expert_dir}: an expert scores one category, this router has "
                f"{len(router.categories)} ({', '.join(router.categories)})"
            )
        (category,) = router.categories
        if category in origin:
            raise TeachError(
                f"{expert_dir}: category {category!r} already has an expert ({origin[category]})"
            )
        origin[category] = expert_dir
        groups.setdefault(input_key(router, expert_dir), {})[category] = router
    return Experts(tuple(origin), tuple(ExpertGroup(members) for members in groups.values()))


def input_key(router: Router, store_dir: Path) -> str:
    """What decides the tensors `router.build_inputs` makes; equal keys, equal inputs.

    The backbone section of `router.json` with its paths resolved (the tokenizer and the
    image preprocessing come from those files), less what only the forward reads (pooling)
    or what only refuses a post (`max_images`: teach loads records for the smallest). Plus a
    digest of the image encoder's weights where there is one: with a feature cache, inputs
    carry that encoder's features, so two experts share inputs only if it is the same.
    """
    fields = router.config.backbone.model_dump(mode="json", exclude={"pooling", "max_images"})
    for name in ("path", "image_path"):
        if fields.get(name) is not None:
            fields[name] = str(resolve_path(fields[name], store_dir).resolve())
    image_encoder = getattr(router.base_backbone, "image_encoder", None)
    if isinstance(image_encoder, torch.nn.Module):
        fields["image_encoder_sha256"] = _weights_digest(image_encoder)
    return json.dumps(fields, sort_keys=True)


def _weights_digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def score_batch(experts: Experts, batch: Sequence[LoadedRecord], out_dir: Path) -> bytes:
    """The output lines of `batch`: each input line with its `teacher` merged.

    Each post is decoded once, for every group of experts. Relative image paths are rewritten
    relative to `out_dir`, where the output file lives, so they still point at the same files.
    """
    posts = [load_post(item) for item in batch]
    scores = experts.probabilities(posts)
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


def _write_span(
    experts: Experts,
    records: Sequence[LoadedRecord],
    span: range,
    path: Path,
    batch_size: int,
    append: bool,
    progress: bool,
    *,
    out_dir: Path | None = None,
    total: int | None = None,
) -> None:
    """Score `records[span]` batch by batch into `path` (appended to, or started afresh).

    Image paths are written relative to `out_dir` (the output's folder; by default `path`'s);
    the progress bar counts `total` records (by default all of them), `span` the last ones.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    total = len(records) if total is None else total
    with (
        path.open("ab" if append else "wb") as handle,
        tqdm(
            total=total, initial=total - len(span), unit="post", desc="teach", disable=not progress
        ) as bar,
    ):
        for begin in range(span.start, span.stop, batch_size):
            batch = records[begin : min(begin + batch_size, span.stop)]
            handle.write(score_batch(experts, batch, out_dir or path.parent))
            handle.flush()  # a crash loses at most the batch in flight
            bar.update(len(batch))
        os.fsync(handle.fileno())


def _resume_alone(
    out: Path, records: Sequence[LoadedRecord], categories: Sequence[str], batch_size: int
) -> int:
    """`resume_point` for one process, which cannot resume a sharded run's parts."""
    folder = parts_dir(out)
    if folder.is_dir():
        if out.exists() and _count_lines(out, records, categories) == len(records):
            shutil.rmtree(folder)  # a merge that stopped before removing its parts
            return len(records)
        raise TeachError(
            f"{folder}: parts of a run sharded over several processes: resume it under "
            "`accelerate launch` with as many processes, or delete them"
        )
    return resume_point(out, records, categories, batch_size)


def parts_dir(out: Path) -> Path:
    """Where a sharded run keeps its part files: `<out>.parts/` beside `out`."""
    return out.with_name(out.name + PARTS_SUFFIX)


def _part_name(span: range) -> str:
    return f"{span.start:09d}-{span.stop:09d}"


def _teach_shard(
    experts: Experts,
    records: Sequence[LoadedRecord],
    out: Path,
    batch_size: int,
    resume: bool,
    progress: bool,
    shard: Shard,
) -> tuple[int, int]:
    """This process's part of a sharded run: (records resumed, records scored) of its slice.

    A process other than the main one ends (`ShardDone`) once its part is complete; the main
    process merges every part into `out`.
    """
    categories = experts.categories
    all_spans = spans(len(records), batch_size, shard.world)
    span = all_spans[shard.rank]
    folder = parts_dir(out)
    name = _part_name(span)
    partial, complete = folder / (name + PARTIAL), folder / (name + COMPLETE)
    if not resume:  # afresh: this process's old part, and (main) parts of other slicings
        partial.unlink(missing_ok=True)
        complete.unlink(missing_ok=True)
        if shard.is_main:
            _remove_foreign_parts(folder, all_spans)
    _start_together(shard, records, span, experts)
    if resume and out.exists() and _count_lines(out, records, categories) == len(records):
        # Finished already: a rerun is a no-op. Parts left by a merge that stopped between
        # replacing `out` and removing them go now.
        if not shard.is_main:
            raise ShardDone(shard.rank)
        shutil.rmtree(folder, ignore_errors=True)
        return len(span), 0
    if resume and out.exists() and not folder.is_dir():
        raise TeachError(
            f"{out}: a partial output of one process; resume it without `accelerate launch`, "
            "or run with --no-resume"
        )
    if resume and (foreign := _foreign_parts(folder, all_spans)):
        raise TeachError(
            f"{folder}: parts of a run with another number of processes or batch size "
            f"({', '.join(path.name for path in foreign[:3])}): resume with the same ones, or "
            "run with --no-resume"
        )
    if resume and complete.exists():
        resumed, scored = len(span), 0
    else:
        part_records = records[span.start : span.stop]
        resumed = resume_point(partial, part_records, categories, batch_size) if resume else 0
        remaining = range(span.start + resumed, span.stop)
        _write_span(
            experts,
            records,
            remaining,
            partial,
            batch_size,
            resume,
            progress and shard.is_main,
            out_dir=out.parent,
            total=len(span),
        )
        partial.replace(complete)  # complete only once every line is on disk (fsync'd)
        scored = len(remaining)
    if not shard.is_main:
        raise ShardDone(shard.rank)
    _merge_parts(out, folder, records, categories, all_spans)
    return resumed, scored


def _start_together(
    shard: Shard, records: Sequence[LoadedRecord], span: range, experts: Experts
) -> None:
    """A barrier once every process has cleared its old part, checking that they agree.

    Without it the main process could take another process's part of an earlier run for
    this run's. Each process also shows what it read, so that processes that read other
    data (a file changed between their reads) or other experts stop here, not at the merge.
    """
    first = next(iter(experts.groups[0].experts.values()))
    view = (len(records), records[0].record.post_id, records[-1].record.post_id, experts.categories)
    views = gather_in_rank_order(shard, (span, view), cpu=first.device.type != "cuda")
    if any(other != view for _, other in views):
        raise TeachError(
            f"the processes of the launch read different data or experts: {[v for _, v in views]}"
        )


def _foreign_parts(folder: Path, all_spans: Sequence[range]) -> list[Path]:
    """Files in `folder` that are no part of this slicing (another process count or batch
    size names other slices: such parts cannot be resumed by this run)."""
    if not folder.is_dir():
        return []
    names = {_part_name(span) + suffix for span in all_spans for suffix in (PARTIAL, COMPLETE)}
    return sorted(path for path in folder.iterdir() if path.name not in names)


def _remove_foreign_parts(folder: Path, all_spans: Sequence[range]) -> None:
    for path in _foreign_parts(folder, all_spans):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _merge_parts(
    out: Path,
    folder: Path,
    records: Sequence[LoadedRecord],
    categories: Sequence[str],
    all_spans: Sequence[range],
) -> None:
    """Wait for every process's part, then concatenate them into `out`, in input order.

    Waits by looking for the parts' files, not in a collective: processes that resumed
    different amounts finish far apart, past any collective's timeout. Each part is checked
    against its slice of the data before `out` is replaced (atomically), then the parts go.
    """
    paths = [folder / (_part_name(span) + COMPLETE) for span in all_spans]
    _wait_for(paths)
    merging = out.with_name(out.name + ".merging")
    with merging.open("wb") as handle:
        for path, span in zip(paths, all_spans, strict=True):
            part_records = records[span.start : span.stop]
            if _count_lines(path, part_records, categories) != len(span):
                raise TeachError(f"{path}: {len(span)} lines expected; delete it to redo it")
            with path.open("rb") as part:
                shutil.copyfileobj(part, handle)
        handle.flush()
        os.fsync(handle.fileno())
    merging.replace(out)
    shutil.rmtree(folder)


def _wait_for(paths: Sequence[Path]) -> None:
    """Block until every path exists (the launcher stops this process if another fails)."""
    last_report = time.monotonic()
    while missing := [path for path in paths if not path.exists()]:
        if time.monotonic() - last_report > WAIT_REPORT_S:
            names = ", ".join(path.name for path in missing[:4])
            print(f"teach: waiting for {len(missing)} parts ({names})", file=sys.stderr)
            last_report = time.monotonic()
        time.sleep(WAIT_POLL_S)


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
    ends = _line_ends(out, records, categories)
    written = len(ends) - 1
    # Batches start at multiples of batch_size; a complete output ends on one too.
    done = written if written == len(records) else written // batch_size * batch_size
    with out.open("r+b") as handle:
        handle.truncate(ends[done])
    return done


def _count_lines(path: Path, records: Sequence[LoadedRecord], categories: Sequence[str]) -> int:
    """How many complete lines of `path` are `records`' first ones (checked, not trimmed)."""
    return len(_line_ends(path, records, categories)) - 1


def _line_ends(path: Path, records: Sequence[LoadedRecord], categories: Sequence[str]) -> list[int]:
    """Byte offsets after each complete line of `path`, each checked against its record."""
    ends = [0]
    with path.open("rb") as handle:
        for number, line in enumerate(_complete_lines(handle), start=1):
            if number > len(records):
                raise TeachError(f"{path}: has more lines than the data has records; not resumed")
            _check_line(path, number, line, records[number - 1], categories)
            ends.append(ends[-1] + len(line))
    return ends


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
