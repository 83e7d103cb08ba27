"""Batch scoring: posts scored in order of their text length, rows returned in input order."""

import json
from pathlib import Path

import numpy as np
import torch

from app.data.records import PostDataset, load_records
from app.data.scoring import _length_order, predict, text_lengths
from app.model.store import load_router


def test_length_sorted_scores_are_the_input_order_scores(tiny_store: Path, tmp_path: Path) -> None:
    router = load_router(tiny_store)
    words = ["spam", "offer", "hello", "cat", "free", "cruise", "now", "claim"]
    rows = [
        {
            "post_id": f"p{i}",
            "title": " ".join(words[(i * 3 + j) % len(words)] for j in range(1 + (i * 7) % 23)),
            "labels": {c: 0 for c in router.categories},
        }
        for i in range(37)
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = PostDataset(load_records(path, router.categories).records, router.categories)
    lengths = text_lengths(router, dataset)
    order = _length_order(router, dataset)
    # The order is by tokens, ties in input order, and not the input order itself here.
    assert [lengths[i] for i in order] == sorted(lengths)
    assert order != list(range(len(rows)))
    with torch.inference_mode():
        one_by_one = np.concatenate(
            [router.predict_proba([dataset[i][0]]).numpy() for i in range(len(rows))]
        )
    sorted_scores = predict(router, dataset, batch_size=8)
    unsorted_scores = predict(router, dataset, batch_size=8, length_sorted=False)
    # Padding changes nothing but rounding: every row is its own post's scores.
    np.testing.assert_allclose(sorted_scores, one_by_one, atol=1e-5)
    np.testing.assert_allclose(unsorted_scores, one_by_one, atol=1e-5)
