"""Batch scoring of a data file: the router's probabilities for every record, in order.

Used by validation during training, teacher scoring, `radar evaluate` and `radar calibrate`,
so that each scores posts with the same loader and the same input builder as serving.

Given a sharded `Shard` (under `accelerate launch`), each process scores only its slice of
whole batches and the slices are gathered in input order (`app.data.sharding`): the same
scores as one process, computed by several.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from app.data.records import PostDataset
from app.data.sharding import Shard, gather_in_rank_order
from app.model.post import Post
from app.model.router import Router


def text_lengths(router: Router, dataset: PostDataset, chunk: int = 1024) -> list[int]:
    """Tokens of each post's text as the router's input builder counts them, truncation
    included: the length a batch pads to. Images are left out, so nothing is decoded.

    One pass of the tokenizer over the data set, about what collating one epoch costs in
    tokenisation; character counts are cheaper but sort badly (on 1,000 proxy posts, batches
    of 32 were 77 % real tokens sorted by characters, 97 % sorted by tokens, 47 % unsorted).
    """
    records = dataset.records
    lengths: list[int] = []
    for start in range(0, len(records), chunk):
        part = records[start : start + chunk]
        posts = [Post(title=r.record.title, ocr_text=r.record.ocr_text) for r in part]
        mask = router.build_inputs(posts).get("attention_mask")
        if mask is None:  # a backbone without a mask: characters stand in
            lengths.extend(len(post.text()) for post in posts)
        else:
            lengths.extend(int(n) for n in mask.sum(dim=1).tolist())
    return lengths


@torch.inference_mode()
def predict(
    router: Router,
    dataset: PostDataset,
    batch_size: int,
    progress: bool = False,
    *,
    shard: Shard | None = None,
    length_sorted: bool = True,
) -> np.ndarray:
    """Scores `[N, K]` for every sample of `dataset`, in order.

    With a sharded `shard` this is a collective (every process of the launch calls it): each
    process scores `shard.span(N, batch_size)` and every process gets all N rows back. Without
    one (the default: validation during training runs on the main process alone) it scores
    everything here and talks to no other process.

    Posts are scored in order of their text length (`length_sorted`), so a batch pads to
    lengths like its own instead of to the longest post of a random draw; the rows come back
    in input order. The order is computed on the whole data set before any sharding, so one
    process and several form the same batches and return the same floats.
    """
    order = _length_order(router, dataset) if length_sorted else None
    view: PostDataset | Subset[Any] = dataset if order is None else Subset(dataset, order)
    if shard is None or not shard.sharded:
        scores = _predict_span(router, view, range(len(dataset)), batch_size, progress)
    else:
        span = shard.span(len(dataset), batch_size)
        rows = _predict_span(router, view, span, batch_size, progress and shard.is_main)
        parts = gather_in_rank_order(shard, (span, rows), cpu=router.device.type != "cuda")
        scores = _merge(parts, len(dataset), len(router.categories))
    if order is None:
        return scores
    restored = np.empty_like(scores)
    restored[order] = scores
    return restored


def _length_order(router: Router, dataset: PostDataset) -> list[int]:
    """Indices of `dataset` by text length in tokens (stable: ties keep input order)."""
    if len(dataset) == 0:
        return []
    lengths = np.asarray(text_lengths(router, dataset))
    return [int(i) for i in np.argsort(lengths, kind="stable")]


def _predict_span(
    router: Router,
    dataset: "PostDataset | Subset[Any]",
    span: range,
    batch_size: int,
    progress: bool,
) -> np.ndarray:
    subset = dataset if span == range(len(dataset)) else Subset(dataset, span)
    loader = DataLoader(subset, batch_size=batch_size, collate_fn=_posts_only)
    rows = [router.predict_proba(posts).numpy() for posts in tqdm(loader, disable=not progress)]
    return np.concatenate(rows) if rows else np.zeros((0, len(router.categories)))


def _merge(parts: Sequence[tuple[range, np.ndarray]], n: int, k: int) -> np.ndarray:
    """The gathered slices as one `[n, k]` array; refuses slices that do not tile `range(n)`.

    Every process computes the same spans from the same data and batch size; a process that
    loaded other data (a file changed between the processes' reads) is caught here.
    """
    start = 0
    for span, rows in parts:
        if span.start != start or rows.shape != (len(span), k):
            raise RuntimeError(
                f"gathered scores of records {span.start}..{span.stop} ({rows.shape[0]} rows), "
                f"expected records from {start}: the processes did not read the same data"
            )
        start = span.stop
    if start != n:
        raise RuntimeError(f"gathered scores end at record {start} of {n}")
    filled = [rows for _, rows in parts if len(rows)]  # an empty slice's zeros are float64
    return np.concatenate(filled) if filled else np.zeros((0, k))


def _posts_only(items: Sequence[Any]) -> list[Any]:
    return [item[0] for item in items]
