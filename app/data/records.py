"""Training data: the JSONL format of DESIGN.md, validated line by line, and its collation.

One post a line: `post_id`, `title`, `ocr_text`, `images` (paths relative to the JSONL file's
directory, or absolute), `labels` `{category: -1|0|1}` and an optional `teacher`
`{category: probability}`. Label codes are the paper's: −1 = NOT ANNOTATED for that category
(not negative), 0 = negative, 1 = positive; a category missing from `labels` counts as −1.

Collation calls `router.build_inputs`, the input builder the service uses, so training and
serving feed the model identical tensors.
"""

import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypedDict

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictStr, ValidationError
from torch import Tensor
from torch.utils.data import Dataset

from app.model.images import ImageDecodeError, decode_rgb
from app.model.post import Post
from app.model.router import Router

MAX_REPORTED_ERRORS = 10  # skip_bad keeps this many messages; the count covers every line
LABEL_CODES = (-1, 0, 1)
NOT_ANNOTATED = -1


class DataError(Exception):
    """A problem in a training-data file: `"{file}:{line}: {field}: {problem}"`.

    `line` and `field` are None for problems of the whole file (then left out of the message).
    """

    def __init__(self, file: Path | str, line: int | None, field: str | None, problem: str) -> None:
        self.file, self.line, self.field, self.problem = Path(file), line, field, problem
        where = f"{file}:{line}" if line is not None else str(file)
        super().__init__(f"{where}: {field}: {problem}" if field else f"{where}: {problem}")


def _label(value: Any) -> int:
    # Strict: `true` or `1.0` is more likely a broken export than a label.
    if type(value) is not int or value not in LABEL_CODES:
        raise ValueError(f"must be -1 (not annotated), 0 (negative) or 1 (positive), got {value!r}")
    return value


def _probability(value: Any) -> float:
    if type(value) not in (int, float) or not (math.isfinite(value) and 0 <= value <= 1):
        raise ValueError(f"must be a probability in [0, 1], got {value!r}")
    return float(value)


Label = Annotated[int, BeforeValidator(_label)]
Probability = Annotated[float, BeforeValidator(_probability)]
NonEmptyStr = Annotated[StrictStr, Field(min_length=1)]


class TrainingRecord(BaseModel):
    """One JSONL line, as written (image paths unresolved)."""

    model_config = ConfigDict(extra="forbid")

    post_id: NonEmptyStr
    title: StrictStr = ""
    ocr_text: StrictStr = ""
    images: list[NonEmptyStr] = Field(default_factory=list)
    labels: dict[str, Label] = Field(default_factory=dict)
    teacher: dict[str, Probability] | None = None


@dataclass(frozen=True)
class LoadedRecord:
    """A validated record with where it came from and its image paths resolved."""

    record: TrainingRecord
    source: Path  # the JSONL file
    line: int  # 1-based line number in `source`
    image_paths: tuple[Path, ...]
    raw: str  # the line as written (teach rewrites it with only `teacher` changed)


@dataclass(frozen=True)
class LoadedRecords:
    """The usable records of one file, and what was skipped (never silently)."""

    path: Path
    records: tuple[LoadedRecord, ...]
    skipped: int
    errors: tuple[str, ...]  # the first MAX_REPORTED_ERRORS messages of skipped lines

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[LoadedRecord]:
        return iter(self.records)

    def __getitem__(self, index: int) -> LoadedRecord:
        return self.records[index]


def load_records(
    path: Path | str,
    categories: Sequence[str],
    *,
    skip_bad: bool = False,
    max_images: int | None = None,
    allow_other_categories: bool = False,
) -> LoadedRecords:
    """Load and validate every line of a JSONL file; raise `DataError` at the first bad one.

    `categories` are the model's. A label or teacher value for any other category is an error
    (a typo would otherwise train nothing), unless `allow_other_categories` (an expert or the
    teacher reads data labelled for all categories). `max_images` (the backbone's) refuses
    posts the input builder would refuse mid-training. With `skip_bad`, bad lines and repeated
    post_ids are skipped and counted instead. Blank lines are ignored.
    """
    path = Path(path)
    check = _LineChecker(path, tuple(categories), max_images, allow_other_categories)
    records: list[LoadedRecord] = []
    seen: dict[str, int] = {}
    errors: list[str] = []
    skipped = 0
    for number, raw in _numbered_lines(path):
        try:
            loaded = check(number, raw)
            first = seen.setdefault(loaded.record.post_id, number)
            if first != number:
                raise DataError(path, number, "post_id", f"duplicate of line {first}")
        except DataError as exc:
            if not skip_bad:
                raise
            skipped += 1
            if len(errors) < MAX_REPORTED_ERRORS:
                errors.append(str(exc))
            continue
        records.append(loaded)
    if not records:
        raise DataError(path, None, None, f"no usable records ({skipped} bad lines skipped)")
    return LoadedRecords(path, tuple(records), skipped, tuple(errors))


def _numbered_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    try:
        handle = path.open("rb")  # bytes: only b"\n" ends a line, and bad UTF-8 is ours to name
    except OSError as exc:
        raise DataError(path, None, None, f"cannot read: {exc.strerror}") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                yield number, raw


@dataclass(frozen=True)
class _LineChecker:
    path: Path
    categories: tuple[str, ...]
    max_images: int | None
    allow_other_categories: bool

    def __call__(self, number: int, raw: bytes) -> LoadedRecord:
        try:
            text = raw.decode("utf-8").rstrip("\r\n")
            data = json.loads(text)
        except UnicodeDecodeError:
            raise DataError(self.path, number, "<line>", "not UTF-8") from None
        except json.JSONDecodeError as exc:
            raise DataError(self.path, number, "<line>", f"not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise DataError(self.path, number, "<line>", "not a JSON object")
        try:
            record = TrainingRecord.model_validate(data)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = _field_name(error["loc"]) or "<line>"
            raise DataError(self.path, number, field, _problem(error)) from None
        self._check_categories(number, record)
        return LoadedRecord(record, self.path, number, self._image_paths(number, record), text)

    def _check_categories(self, number: int, record: TrainingRecord) -> None:
        if self.allow_other_categories:
            return
        for kind, values in (("labels", record.labels), ("teacher", record.teacher or {})):
            for name in values:
                if name not in self.categories:
                    known = ", ".join(self.categories)
                    problem = f"unknown category (the model's: {known})"
                    raise DataError(self.path, number, f"{kind}.{name}", problem)

    def _image_paths(self, number: int, record: TrainingRecord) -> tuple[Path, ...]:
        if self.max_images is not None and len(record.images) > self.max_images:
            problem = f"{len(record.images)} images; the model takes at most {self.max_images}"
            raise DataError(self.path, number, "images", problem)
        paths = tuple(resolve_image(self.path, image) for image in record.images)
        for index, image in enumerate(paths):
            if not image.is_file():
                raise DataError(self.path, number, f"images[{index}]", f"no such file: {image}")
        return paths


def resolve_image(jsonl: Path, image: str) -> Path:
    """An image path as written in `jsonl`: absolute, or relative to the file's directory."""
    path = Path(image)
    return path if path.is_absolute() else jsonl.parent / path


def _field_name(loc: tuple[int | str, ...]) -> str:
    """("images", 2) → "images[2]", ("labels", "lqc") → "labels.lqc"."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part != "[key]":
            name += f".{part}" if name else str(part)
    return name


def _problem(error: Any) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown field"
    if error["type"] == "missing":
        return "missing"
    return str(error["msg"]).removeprefix("Value error, ")


def label_matrix(records: Sequence[LoadedRecord], categories: Sequence[str]) -> np.ndarray:
    """Labels `[N, K]` (int64) in category order; a category a record leaves out is −1."""
    matrix = np.full((len(records), len(categories)), NOT_ANNOTATED, dtype=np.int64)
    for row, item in enumerate(records):
        for col, name in enumerate(categories):
            matrix[row, col] = item.record.labels.get(name, NOT_ANNOTATED)
    return matrix


def teacher_matrix(records: Sequence[LoadedRecord], categories: Sequence[str]) -> np.ndarray:
    """Teacher probabilities `[N, K]` (float32), NaN where the record has no teacher value."""
    matrix = np.full((len(records), len(categories)), np.nan, dtype=np.float32)
    for row, item in enumerate(records):
        teacher = item.record.teacher or {}
        for col, name in enumerate(categories):
            if name in teacher:
                matrix[row, col] = teacher[name]
    return matrix


def filter_annotated(records: Sequence[LoadedRecord], category: str) -> list[LoadedRecord]:
    """The records annotated (label ≠ −1) for `category`: an expert's training set."""
    kept = [item for item in records if item.record.labels.get(category, -1) != NOT_ANNOTATED]
    if not kept:
        source = records[0].source if records else "<no records>"
        raise DataError(source, None, f"labels.{category}", "no record is annotated for it")
    return kept


def load_image(item: LoadedRecord, index: int) -> Image.Image:
    """Decode `item`'s `index`-th image to RGB, as the service decodes an uploaded one."""
    path = item.image_paths[index]
    try:
        return decode_rgb(path)
    except ImageDecodeError as exc:
        # Name the file, except for the pixel limit (the file is readable, just too big).
        if exc.over_limit:
            problem = exc.problem
        else:
            problem = f"{exc.problem}: {path}" + (f": {exc.detail}" if exc.detail else "")
    raise DataError(item.source, item.line, f"images[{index}]", problem)


def load_post(item: LoadedRecord) -> Post:
    """The model's view of a record, its images decoded from disk."""
    images = tuple(load_image(item, index) for index in range(len(item.image_paths)))
    return Post(title=item.record.title, ocr_text=item.record.ocr_text, images=images)


class PostDataset(Dataset[tuple[Post, Tensor, Tensor]]):
    """Items `(post, labels [K] long, teacher [K] float with NaN where missing)`.

    Images are decoded in `__getitem__`, so DataLoader workers do it in parallel.
    """

    def __init__(self, records: Sequence[LoadedRecord], categories: Sequence[str]) -> None:
        self.records = tuple(records)
        self.categories = tuple(categories)
        self.labels = torch.from_numpy(label_matrix(self.records, self.categories))
        self.teacher = torch.from_numpy(teacher_matrix(self.records, self.categories))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[Post, Tensor, Tensor]:
        # clone: a row view would carry (and ship to the main process) the whole matrix.
        post = load_post(self.records[index])
        return post, self.labels[index].clone(), self.teacher[index].clone()


class Batch(TypedDict):
    """One collated batch; `teacher` is NaN exactly where `teacher_mask` is False."""

    inputs: dict[str, Tensor]  # router.build_inputs(posts): CPU tensors
    labels: Tensor  # [B, K] long in {−1, 0, 1}
    teacher: Tensor  # [B, K] float
    teacher_mask: Tensor  # [B, K] bool


class RouterCollate:
    """A DataLoader `collate_fn` building inputs with the router's (= the service's) builder.

    A class rather than a closure so that it pickles for DataLoader workers.
    """

    def __init__(self, router: Router) -> None:
        self.router = router

    def __call__(self, batch: Sequence[tuple[Post, Tensor, Tensor]]) -> Batch:
        posts = [post for post, _, _ in batch]
        teacher = torch.stack([row for _, _, row in batch])
        return Batch(
            inputs=self.router.build_inputs(posts),
            labels=torch.stack([row for _, row, _ in batch]),
            teacher=teacher,
            teacher_mask=~torch.isnan(teacher),
        )


def make_collate(router: Router) -> RouterCollate:
    """The collate_fn for a `PostDataset` feeding `router`."""
    return RouterCollate(router)


def fingerprint(paths: Iterable[Path | str]) -> str:
    """`"sha256:<hex>"` over each JSONL file's bytes and those of every image it references.

    A changed image changes it. Images are hashed once per file, in order of first reference;
    a missing one (a line skipped as bad) hashes as its path, so it still counts.
    """
    digest = hashlib.sha256()
    for path in map(Path, paths):
        _hash_file(digest, path)
        for image in _referenced_images(path):
            if image.is_file():
                _hash_file(digest, image)
            else:
                digest.update(b"missing:" + str(image).encode())
    return f"sha256:{digest.hexdigest()}"


def _hash_file(digest: Any, path: Path) -> None:
    # The size first, so that bytes moving from one file to the next change the digest.
    digest.update(path.stat().st_size.to_bytes(8, "big"))
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)


def _referenced_images(path: Path) -> list[Path]:
    seen: dict[Path, None] = {}
    with path.open("rb") as handle:
        for raw in handle:
            try:
                images = json.loads(raw).get("images", [])
            except (ValueError, AttributeError):
                continue  # a bad line: load_records reports it
            for image in images if isinstance(images, list) else []:
                if isinstance(image, str) and image:
                    seen.setdefault(resolve_image(path, image), None)
    return list(seen)
