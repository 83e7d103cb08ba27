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
from app.model.router import Router


@torch.inference_mode()
def predict(
    router: Router,
    dataset: PostDataset,
    batch_size: int,
    progress: bool = False,
    *,
    shard: Shard | None = None,
) -> np.ndarray:
    """Scores `[N, K]` for every sample of `dataset`, in order.

    With a sharded `shard` this is a collective (every process of the launch calls it): each
    process scores `shard.span(N, batch_size)` and every process gets all N rows back. Without
    one (the default: validation during training runs on the main process alone) it scores
    everything here and talks to no other process.
    """
    if shard is None or not shard.sharded:
        return _predict_span(router, dataset, range(len(dataset)), batch_size, progress)
    span = shard.span(len(dataset), batch_size)
    rows = _predict_span(router, dataset, span, batch_size, progress and shard.is_main)
    parts = gather_in_rank_order(shard, (span, rows), cpu=router.device.type != "cuda")
    return _merge(parts, len(dataset), len(router.categories))


def _predict_span(
    router: Router, dataset: PostDataset, span: range, batch_size: int, progress: bool
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
