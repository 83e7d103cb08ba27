"""Readers for the public datasets of the proxy benchmark: one annotation pipeline each.

Each reader turns one folder of `../shared/data` into `SourceRow`s labelled for that source's
own categories only (0/1); `proxy_data` fills every other category with -1 ("not annotated",
DESIGN.md's code), which is the paper's disjoint annotation. `docs/proxy_data.md` explains
why each category and label rule was chosen.

All files are read as bytes and decoded with `errors="replace"`: OLID has lines cut inside a
UTF-8 sequence, and one bad byte must cost one U+FFFD, not the whole source.
"""

import csv
import html
import io
import json
import re
import unicodedata
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

CATEGORIES: tuple[str, ...] = ("toxic", "hate", "offensive", "spam", "smear")
MEMES_DIR = "propaganda_memes/data/datasets/propaganda/defaults"
MEMES_SPLITS = ("train", "val", "test")  # the upstream split names, which we keep
YOUTUBE_FILES = tuple(
    f"youtube_spam/Youtube0{n}-{video}.csv"
    for n, video in enumerate(("Psy", "KatyPerry", "LMFAO", "Eminem", "Shakira"), start=1)
)
ETHOS_HATE_SHARE = 0.5  # isHate is the share of annotators voting hate; >= 0.5 gives 433 hate

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)
_TAG = re.compile(r"<[^>]{0,500}>")
_MENTION = re.compile(r"@\w+")
_URL = re.compile(r"https?://\S+")


@dataclass(frozen=True)
class SourceRow:
    """One post as read from a source, before capping and splitting."""

    post_id: str
    title: str
    ocr_text: str
    image: Path | None
    labels: Mapping[str, int]  # this pipeline's own categories only, 0 or 1
    stratum: str  # rows are subsampled and split per stratum (label, or label x sub-group)
    split: str | None = None  # the upstream split, for a source that ships one


@dataclass(frozen=True)
class Source:
    """One annotation pipeline: its name, its categories, its files and its reader."""

    name: str
    categories: tuple[str, ...]
    files: tuple[str, ...]  # relative to the shared data folder; fingerprinted in the manifest
    read: Callable[[Path], Iterator[SourceRow]]


def decode_file(path: Path) -> str:
    """The file's text, with broken UTF-8 replaced by U+FFFD and a BOM dropped."""
    return path.read_bytes().decode("utf-8-sig", errors="replace")


def clean_text(raw: str, *, keep_lines: bool = False) -> str:
    """Unescape HTML entities, NFC-normalise, drop control characters, squeeze whitespace.

    `keep_lines` keeps one line per non-empty input line (OCR text boxes); otherwise all
    whitespace, newlines included, becomes single spaces.
    """
    text = unicodedata.normalize("NFC", html.unescape(raw))
    text = _CONTROL.sub(" ", text)
    if keep_lines:
        lines = (" ".join(line.split()) for line in text.splitlines())
        return "\n".join(line for line in lines if line)
    return " ".join(text.split())


def _csv_rows(path: Path, delimiter: str = ",") -> Iterator[dict[str, str]]:
    """Rows of a headed CSV as dicts (quoted fields may span lines)."""
    yield from csv.DictReader(io.StringIO(decode_file(path), newline=""), delimiter=delimiter)


def _text_row(
    source: str, row_id: str, text: str, category: str, label: int, stratum: str | None = None
) -> SourceRow:
    """A text-only post labelled for one category."""
    return SourceRow(
        post_id=f"{source}:{row_id}",
        title=text,
        ocr_text="",
        image=None,
        labels={category: label},
        stratum=stratum if stratum is not None else f"{category}={label}",
    )


def read_jigsaw(shared: Path) -> Iterator[SourceRow]:
    """Jigsaw toxic comments (Wikipedia talk pages): `toxic` column, 0/1."""
    for row in _csv_rows(shared / "jigsaw_toxiscan/jigsaw_sample.csv"):
        label = int(row["toxic"])
        yield _text_row("jigsaw", row["id"], clean_text(row["comment_text"]), "toxic", label)


def _tweet_text(raw: str) -> str:
    """Davidson tweets in OLID's conventions (@USER, URL), so no handle betrays the source."""
    return _URL.sub("URL", _MENTION.sub("@USER", clean_text(raw)))


def read_davidson(shared: Path) -> Iterator[SourceRow]:
    """Davidson et al. tweets: hate = class 0 (hate speech); offensive (1) and neither (2) = 0.

    Stratified on the three-way class so that hate-free splits keep their offensive/neither mix.
    """
    names = {"0": "hate", "1": "offensive", "2": "neither"}
    for row in _csv_rows(shared / "davidson/labeled_data.csv"):
        label = int(row["class"] == "0")
        stratum = f"class={names[row['class']]}"
        yield _text_row("davidson", row[""], _tweet_text(row["tweet"]), "hate", label, stratum)


def read_ethos(shared: Path) -> Iterator[SourceRow]:
    """ETHOS binary (`;`-separated): hate iff isHate >= 0.5; ids are 1-based data-row numbers."""
    for number, row in enumerate(_csv_rows(shared / "ethos/Ethos_Dataset_Binary.csv", ";"), 1):
        label = int(float(row["isHate"]) >= ETHOS_HATE_SHARE)
        yield _text_row("ethos", str(number), clean_text(row["comment"]), "hate", label)


def _olid_field(raw: str) -> str:
    """Undo OLID's CSV-style quoting: 1,052 tweets are wrapped in quotes with quotes doubled."""
    if len(raw) >= 2 and raw.startswith('"') and raw.endswith('"'):
        return raw[1:-1].replace('""', '"')
    return raw


def read_olid(shared: Path) -> Iterator[SourceRow]:
    """OLID (OffensEval 2019) training set, subtask A: OFF = 1, NOT = 0.

    Tab-separated with CRLF endings; read without CSV quoting (tweets hold stray quotes),
    then unquote the fields that are quoted as a whole.
    """
    lines = decode_file(shared / "olid/olid-training-v1.0.tsv").splitlines()
    header = lines[0].split("\t")
    for line in lines[1:]:
        if not line.strip():
            continue
        row = dict(zip(header, line.split("\t"), strict=True))
        label = int(row["subtask_a"] == "OFF")
        text = clean_text(_olid_field(row["tweet"]))
        yield _text_row("olid", row["id"], text, "offensive", label)


def read_sms(shared: Path) -> Iterator[SourceRow]:
    """UCI SMS Spam Collection: `label<TAB>text`, spam = 1, ham = 0; skips its header line.

    Ids are 1-based data-row numbers (the header is not counted).
    """
    lines = decode_file(shared / "sms_spam/SMSSpamCollection").splitlines()
    if lines and lines[0].split("\t") == ["Label", "SMS"]:
        lines = lines[1:]
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        label, text = line.split("\t", 1)
        yield _text_row("sms", str(number), clean_text(text), "spam", int(label == "spam"))


def _youtube_text(raw: str) -> str:
    """A YouTube comment without its HTML markup (`<br />`, links), keeping link text."""
    return clean_text(_TAG.sub("", _BR.sub(" ", raw)))


def read_youtube(shared: Path) -> Iterator[SourceRow]:
    """UCI YouTube Spam Collection, five videos' CSVs: CLASS 1 = spam.

    Stratified on video x label so that every split sees every video's comments.
    """
    for name in YOUTUBE_FILES:
        video = Path(name).stem.split("-", 1)[1]
        for row in _csv_rows(shared / name):
            label = int(row["CLASS"])
            text = _youtube_text(row["CONTENT"])
            stratum = f"video={video},spam={label}"
            yield _text_row("youtube", row["COMMENT_ID"], text, "spam", label, stratum)


def read_memes(shared: Path) -> Iterator[SourceRow]:
    """Propaganda memes (image + OCR text): smear = the meme uses the "Smears" technique.

    The upstream train/val/test split is kept. Only 36 of 950 memes carry no technique at
    all, so "any propaganda" would be a 96 % positive category; Smears (602 of 950) is the
    most frequent technique and one the image often carries (the paper's categories are
    visual too), so it is the category.
    """
    root = shared / MEMES_DIR
    for split in MEMES_SPLITS:
        for line in decode_file(root / f"annotations/{split}.jsonl").splitlines():
            if not line.strip():
                continue
            meme = json.loads(line)
            label = int("Smears" in meme["labels"])
            yield SourceRow(
                post_id=f"memes:{meme['id']}",
                title="",
                ocr_text=clean_text(meme["text"], keep_lines=True),
                image=root / "images" / meme["image"],
                labels={"smear": label},
                stratum=f"smear={label}",
                split=split,
            )


SOURCES: tuple[Source, ...] = (
    Source("jigsaw", ("toxic",), ("jigsaw_toxiscan/jigsaw_sample.csv",), read_jigsaw),
    Source("davidson", ("hate",), ("davidson/labeled_data.csv",), read_davidson),
    Source("ethos", ("hate",), ("ethos/Ethos_Dataset_Binary.csv",), read_ethos),
    Source("olid", ("offensive",), ("olid/olid-training-v1.0.tsv",), read_olid),
    Source("sms", ("spam",), ("sms_spam/SMSSpamCollection",), read_sms),
    Source("youtube", ("spam",), YOUTUBE_FILES, read_youtube),
    Source(
        "memes",
        ("smear",),
        tuple(f"{MEMES_DIR}/annotations/{split}.jsonl" for split in MEMES_SPLITS),
        read_memes,
    ),
)
