"""Named service errors; `app.service.app` maps each to an HTTP response at the edge."""

from typing import ClassVar, Literal

# Why a request was refused (`radar_rejected_total{reason}`, one count per refused request,
# made where the refusal is answered): the batcher's 503s (queue_full, overloaded), the
# in-flight pixel ceiling (images_busy), deadlines, callers that hung up, and the 422/413/408s.
RejectReason = Literal[
    "queue_full",
    "overloaded",
    "deadline",
    "client_gone",
    "invalid_request",
    "bad_post",
    "too_many_posts",
    "too_many_pixels",
    "images_busy",
    "body_too_large",
    "body_timeout",
]


class ServiceError(Exception):
    """An error with an HTTP status and a short machine-readable code; `rejection` is the
    reason a refused request is counted under (None: not a refusal, e.g. 401, 404)."""

    status_code = 500
    code = "internal"
    rejection: ClassVar[RejectReason | None] = None

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)

    def headers(self) -> dict[str, str]:
        return {}


class RetryableError(ServiceError):
    """503s: the caller should come back after `retry_after_s`."""

    status_code = 503

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class QueueFullError(RetryableError):
    code = "queue_full"
    rejection = "queue_full"


class OverloadedError(RetryableError):
    """Queued now, the request would likely miss its deadline: refused at once instead."""

    code = "overloaded"
    rejection = "overloaded"


class ImagesBusyError(RetryableError):
    """The images of requests in progress hold `RADAR_MAX_INFLIGHT_PIXELS` already."""

    code = "images_busy"
    rejection = "images_busy"


class NotReadyError(RetryableError):
    code = "not_ready"


class DecisionLogUnavailableError(RetryableError):
    """The decision log cannot take verdicts now (its database is down); nothing was stored."""

    code = "decision_log_unavailable"


class DeadlineExceededError(ServiceError):
    status_code = 504
    code = "deadline_exceeded"
    rejection = "deadline"


class BadPostError(ServiceError):
    """A post the router cannot take (undecodable image, too many images, ...)."""

    status_code = 422
    code = "bad_post"
    rejection = "bad_post"

    def __init__(self, post_id: str, field: str, problem: str) -> None:
        super().__init__(f"post {post_id!r}, {field}: {problem}")
        self.post_id = post_id
        self.field = field


class AdminDisabledError(ServiceError):
    status_code = 404
    code = "admin_disabled"


class UnauthorizedError(ServiceError):
    status_code = 401
    code = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class ForbiddenError(ServiceError):
    status_code = 403
    code = "forbidden"


class ClientGoneError(ServiceError):
    """The caller disconnected before its answer was ready; nobody reads this response.

    499 is nginx's "client closed request": it shows in access logs, never to a caller.
    """

    status_code = 499
    code = "client_closed_request"
    rejection = "client_gone"


class TooManyPostsError(ServiceError):
    status_code = 413
    code = "too_many_posts"
    rejection = "too_many_posts"


class TooManyPixelsError(ServiceError):
    """A request whose images would decode to more than `RADAR_MAX_REQUEST_PIXELS`."""

    status_code = 413
    code = "too_many_pixels"
    rejection = "too_many_pixels"


class FeedbackDisabledError(ServiceError):
    """`POST /feedback` without a decision log to join verdicts to."""

    status_code = 404
    code = "feedback_disabled"
