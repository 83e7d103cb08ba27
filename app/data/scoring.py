"""Batch scoring of a data file: the router's probabilities for every record, in order.

Used by validation during training, teacher scoring, `radar evaluate` and `radar calibrate`,
so that each scores posts with the same loader and the same input builder as serving.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from app.data.records import PostDataset
from app.model.router import Router


@torch.inference_mode()
def predict(
    router: Router, dataset: PostDataset, batch_size: int, progress: bool = False
) -> np.ndarray:
    """Scores `[N, K]` for every sample of `dataset`, in order."""
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=_posts_only)
    rows = [router.predict_proba(posts).numpy() for posts in tqdm(loader, disable=not progress)]
    return np.concatenate(rows) if rows else np.zeros((0, len(router.categories)))


def _posts_only(items: Sequence[Any]) -> list[Any]:
    return [item[0] for item in items]
