"""The admission policy: refuse a request at once (503 + Retry-After) when its posts would
likely miss their deadline, from the measured batch cycle time per post. (The middleware that
applies it before a body is read is `app/service/admission.py`.)

A bounded queue alone does not keep answers in time. When the queue holds more than the model
can clear before the callers' deadline, every queued post expires and the goodput collapses
(each answer a 504 after the whole deadline). `AdmissionPolicy.admit` refuses when the wait before
a request's first post reaches the model would take more than `ADMIT_SHARE` of its remaining
time, or the wait plus its own posts more than `FINISH_SHARE`.

Fairness between requests of different sizes (issue 14, item 6). The wait and the request's
own posts are weighed apart: weighing a 64-post batch's own model time against
`ADMIT_SHARE` (64 x 19 ms = 1.2 s > 0.3 x 2 s on CPU) refused it whenever anything at all
was queued, so a caller of batches got 503 after 503 while a caller of single posts kept
routing. And under overload, small requests fill every gap a large one could use: a single
post needs the queue to hold at most 0.3 of a deadline's work, a 64-post batch needs it far
shorter. So a large request refused for capacity leaves a *claim* on its size for
`CLAIM_RETRIES` Retry-After periods: smaller requests are then admitted only while the
queue stays short enough for the largest claim to fit beside them (`FINISH_SHARE`), so it
drains to what the large request needs and its retry gets in. We chose this over splitting
a request (an answer is all or nothing: a half-admitted batch is work thrown away) and over
round-robin in the queue (it orders posts already admitted; the starvation is at the door).
It keeps the overload protection: a claim only ever makes admission stricter, it holds one
size per entry (bounded by `RADAR_MAX_POSTS_PER_REQUEST`), it lapses by itself, and a request
that could not finish in time even in an empty queue leaves none. Refusing still costs no
work: the check is arithmetic on counters.
"""

import time
from collections.abc import Callable

from app.service.errors import OverloadedError, QueueFullError

# Admit while the expected queue wait is at most this share of the time left: the rest
# covers reading and decoding the request, the post's own batch, estimate noise and the
# answer's way back. 0.5 still let ~6 % of requests time out at 5x saturation on 2 CPUs
# (docs/reliability.md); at 0.3 none did, and the queue still holds several full batches.
ADMIT_SHARE = 0.3
# The wait plus the request's own posts may take at most this share of its remaining time: the
# rest covers reading the request, estimate noise and the answer's way back. The request's own
# posts go to the model in full batches, which cost no more per post than the cycles the
# estimate was measured on, so this share can be much larger than ADMIT_SHARE. For a single
# post it adds nothing to ADMIT_SHARE's check.
FINISH_SHARE = 0.8
# A large request refused for capacity keeps its room this many Retry-After periods: a caller
# that retries as told finds the queue drained to what it needs.
CLAIM_RETRIES = 2
# Weight of the newest batch in the moving average of cycle time per post: quick to follow
# a slowdown (a median of recent batches lagged, and admitted posts then timed out).
COST_EWMA = 0.2
# One batch may count as at most this many times the current estimate: a single batch
# stalled by a CPU hiccup must not refuse traffic by itself; a real slowdown still lifts
# the estimate by up to 1.6x per batch.
COST_STEP = 4.0


class AdmissionPolicy:
    """The door of the batcher's queue: capacity, deadlines and the claims of large requests.

    `held` counts the posts that take room in the queue (queued, or gathered and prepared
    ahead of the model); `ahead` every post a new one would wait behind (those, the forward
    running now, and admitted posts whose images are still decoding). Both are the batcher's
    counters, read at each decision.
    """

    def __init__(
        self,
        *,
        capacity: int,
        retry_after_s: int,
        held: Callable[[], int],
        ahead: Callable[[], int],
    ) -> None:
        self.capacity = capacity
        self.retry_after_s = retry_after_s
        self._held = held
        self._ahead_now = ahead
        self.post_cost_s: float | None = None  # batch cycle time per post, moving average
        # Claims of large requests refused for capacity: posts -> when the claim lapses
        # (time.monotonic()). One entry per size, so at most max_posts_per_request entries.
        self._claims: dict[int, float] = {}

    def record_cycle(self, per_post_s: float) -> None:
        """One batch's cycle time per post, into the moving average (`COST_EWMA`, `COST_STEP`)."""
        old = self.post_cost_s
        if old is None:
            self.post_cost_s = per_post_s
            return
        step = min(per_post_s, COST_STEP * old)
        self.post_cost_s = (1 - COST_EWMA) * old + COST_EWMA * step

    def expected_wait_s(self, posts: int = 1, pending: int = 0) -> float:
        """Seconds before the last of `posts` more posts would reach the model, from recent
        batches; `pending` counts posts on their way to the queue (requests being read).

        Zero with nothing ahead, whatever the estimate: an idle router always admits, so a
        stale estimate (one slow batch) can never refuse every request for good.
        """
        ahead = self._ahead(pending)
        if self.post_cost_s is None or ahead == 0:
            return 0.0
        return (ahead + posts - 1) * self.post_cost_s

    def claimed_posts(self, smaller_than: int | None = None) -> int:
        """The largest live claim (0: none), only among claims larger than `smaller_than`
        posts when given: the room a request of that size must leave."""
        now = time.monotonic()
        for size, until in list(self._claims.items()):
            if until <= now:
                del self._claims[size]
        sizes = [n for n in self._claims if smaller_than is None or n > smaller_than]
        return max(sizes, default=0)

    def admit(self, posts: int, deadline: float, pending: int = 0, *, claims: bool = True) -> None:
        """Raise a 503 error now if `posts` more would overflow the queue or, by the recent
        model time per post, likely miss `deadline` (`time.monotonic()`): the wait before
        the first of them against `ADMIT_SHARE` of the time left, the wait and all of them
        (and the room claimed by larger refused requests) against `FINISH_SHARE`.

        `claims=False` before the body is read (the admission middleware): the request's
        size is not known yet, and a claimer's own retry must not be refused by its claim.
        """
        if self._held() + posts > self.capacity:
            raise QueueFullError("the router's queue is full", self.retry_after_s)
        if self._fits(posts, deadline, pending, claims):
            if claims:
                self._claims.pop(posts, None)  # a claimer's retry got in: its room is free
            return
        if claims:
            self._claim(posts, deadline)
        raise OverloadedError(
            "the router cannot answer within the deadline now", self.retry_after_s
        )

    def _ahead(self, pending: int) -> int:
        return max(self._ahead_now(), pending)

    def _fits(self, posts: int, deadline: float, pending: int, claims: bool) -> bool:
        cost, ahead = self.post_cost_s, self._ahead(pending)
        if cost is None or ahead == 0:
            return True  # idle: nothing to wait for, whatever the estimate (`expected_wait_s`)
        remaining = deadline - time.monotonic()
        room = self.claimed_posts(smaller_than=posts) if claims else 0
        return (
            ahead * cost <= ADMIT_SHARE * remaining
            and (ahead + posts + room) * cost <= FINISH_SHARE * remaining
        )

    def _claim(self, posts: int, deadline: float) -> None:
        """Keep room for a refused request until its caller is back, if it would fit a
        drained queue (one that never could would only hold everyone else off)."""
        cost, now = self.post_cost_s, time.monotonic()
        if posts > 1 and cost is not None and posts * cost <= FINISH_SHARE * (deadline - now):
            self._claims[posts] = now + CLAIM_RETRIES * self.retry_after_s
