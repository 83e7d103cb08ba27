"""The operations drill's traffic: seeded synthetic posts, the truth the verticals judge them
by, and the stream that routes them and posts the verdicts (`benchmarks/ops_drill.py`).

The truth is a function of the router's score (the tiny router's scores mean nothing, so
the drill decides which posts violate): healthy, a post violates a category iff its score is
in the top 30 % of that category's scores; drifted, one category also has a new kind of
violating post, half of those scored between its 10th and 40th percentiles, all under tau.
"""

import hashlib
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np


class StreamError(RuntimeError):
    """The stream stopped (the service refused a request, or went away)."""


WORDS = (
    "cheap", "pills", "cat", "video", "free", "money", "garden", "news", "vote", "win",
    "prize", "dog", "sale", "click", "now", "recipe", "travel", "crypto", "loan", "meme",
    "dance", "hate", "crowd",
)  # fmt: skip


def draw(post_id: str, salt: str) -> float:
    """A uniform number fixed by the post (not the audit's draw: another salt)."""
    digest = hashlib.blake2b(f"{salt}\x00{post_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass(frozen=True)
class Truth:
    """What the verticals would say: top 30 % of scores violate; the drifted category also
    has a new kind of violating post among scores between its 10th and 40th percentiles."""

    high: dict[str, float]
    band: tuple[float, float]
    category: str

    @classmethod
    def from_scores(cls, categories: Iterable[str], scores: np.ndarray, category: str) -> "Truth":
        names = list(categories)
        high = {name: float(np.quantile(scores[:, k], 0.70)) for k, name in enumerate(names)}
        column = scores[:, names.index(category)]
        band = (float(np.quantile(column, 0.10)), float(np.quantile(column, 0.40)))
        return cls(high, band, category)

    def violating(self, post_id: str, category: str, score: float, drifted: bool) -> bool:
        if score >= self.high[category]:
            return True
        new_kind = self.band[0] <= score < self.band[1] and draw(post_id, "new-kind") < 0.5
        return drifted and category == self.category and new_kind


def post(prefix: str, i: int, rng: np.random.Generator) -> dict[str, Any]:
    """A post of 2-8 random words. The index stays out of the text: the tiny router's scores
    follow its digits, so consecutive posts (1800-1899) would score alike and the stream
    would drift by itself (a healthy category's estimate, restarted at a promotion, once
    read 4 hits among the first 34 audits)."""
    words = rng.choice(WORDS, size=int(rng.integers(2, 9)))
    return {"post_id": f"{prefix}{i}", "title": " ".join(words), "ocr_text": ""}


def scored_posts(
    path: Path, model_dir: Path, prefix: str, n: int, seed: int
) -> tuple[list[dict[str, Any]], np.ndarray, list[str]]:
    """`n` seeded posts written to `path` unlabelled and scored by the router (as `radar
    calibrate` will score them): the posts, their scores and the model's categories."""
    from app.evaluation.evaluate import score_data

    rng = np.random.default_rng(seed)
    posts = [post(prefix, i, rng) for i in range(n)]
    path.write_text("".join(json.dumps({**p, "images": [], "labels": {}}) + "\n" for p in posts))
    scored = score_data(model_dir, path)
    return posts, scored.scores, list(scored.categories)


def write_labelled(
    path: Path,
    posts: list[dict[str, Any]],
    scores: np.ndarray,
    names: list[str],
    label: Callable[[str, str, float], bool],
    categories: Iterable[str] | None = None,
) -> None:
    """The posts again, each category of `categories` (None: all) labelled by
    `label(post_id, category, score)`, the others -1 (not annotated)."""
    wanted = set(names if categories is None else categories)
    with path.open("w") as out:
        for row, p in zip(scores, posts, strict=True):
            labels = {
                name: int(label(p["post_id"], name, float(row[k]))) if name in wanted else -1
                for k, name in enumerate(names)
            }
            out.write(json.dumps({**p, "images": [], "labels": labels}) + "\n")


class Stream(threading.Thread):
    """The upload pipeline and the verticals: posts at a steady rate, verdicts for what was
    dispatched or audited."""

    def __init__(
        self,
        base_url: str,
        headers: dict[str, str],
        truth: Truth,
        posts_per_s: float,
        batch: int,
        seed: int,
    ) -> None:
        super().__init__(name="drill-stream", daemon=True)
        self.base_url, self.headers, self.truth = base_url, headers, truth
        self.posts_per_s, self.batch, self.seed = posts_per_s, batch, seed
        self.drifted = False
        self.halt = threading.Event()
        self.error: BaseException | None = None
        self.counts: Counter[str] = Counter()

    def run(self) -> None:
        try:
            self._stream()
        except BaseException as exc:  # reported by check(), in the drill's thread
            self.error = exc

    def check(self) -> None:
        if self.error is not None:
            raise StreamError(f"the stream stopped: {self.error!r}") from self.error
        if not self.is_alive() and not self.halt.is_set():
            raise StreamError("the stream stopped")

    def _stream(self) -> None:
        rng = np.random.default_rng(self.seed + 1)
        period = self.batch / self.posts_per_s
        next_at, i = time.monotonic(), 0
        with httpx.Client(base_url=self.base_url, headers=self.headers, timeout=30.0) as client:
            while not self.halt.is_set():
                posts = [post("s", i + j, rng) for j in range(self.batch)]
                i += len(posts)
                drifted = self.drifted
                answer = client.post("/route/batch", json={"posts": posts})
                answer.raise_for_status()
                verdicts = list(self._verdicts(answer.json()["results"], drifted))
                if verdicts:
                    client.post("/feedback", json={"verdicts": verdicts}).raise_for_status()
                self.counts["posts"] += len(posts)
                self.counts["verdicts"] += len(verdicts)
                next_at += period
                self.halt.wait(max(0.0, next_at - time.monotonic()))

    def _verdicts(self, results: list[dict[str, Any]], drifted: bool) -> Iterable[dict[str, Any]]:
        for result in results:
            for name in (*result["dispatch"], *result["audit"]):
                violating = self.truth.violating(
                    result["post_id"], name, result["scores"][name], drifted
                )
                if name in result["audit"]:
                    self.counts[f"audited {name}"] += 1
                    self.counts[f"audited misses {name}"] += violating
                yield {"post_id": result["post_id"], "category": name, "violating": violating}
