"""Service settings: one pydantic-settings class, environment prefix `RADAR_`.

A bad value fails at start-up with a message naming the variable.
"""

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.feedback.schema import LogLocationError, log_url
from app.service.schemas import MAX_IMAGES_CEILING, MAX_POSTS_CEILING, MAX_VERDICTS_CEILING


class Settings(BaseSettings):
    """Every knob of the service; `RADAR_<NAME>` in the environment overrides each."""

    model_config = SettingsConfigDict(env_prefix="RADAR_", extra="forbid", frozen=True)

    model_dir: Path = Field(default=Path("model_store/proxy"), description="model-store dir")
    thresholds_path: Path = Field(default=Path("thresholds/proxy.yaml"))
    shadow_thresholds_path: Path | None = Field(
        default=None,
        description="candidate thresholds decided beside the active ones, never acting "
        "(radar_shadow_* metrics); unset: no shadow",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model_thread_nice: int = Field(
        default=0,
        ge=0,
        le=19,
        description="nice value of the model thread (Linux), e.g. 10 on dedicated CPUs: the "
        "event loop (answers, 503s) goes first under overload; 0 off (shared machines)",
    )
    torch_threads: int = Field(
        default=0,
        ge=0,
        le=256,
        description="CPU threads per forward (torch intra-op); 0 keeps torch's default",
    )

    max_batch_size: int = Field(default=32, ge=1, le=1024, description="posts per forward")
    max_wait_ms: float = Field(default=5.0, ge=0.0, le=1000.0, description="batch gather wait")
    queue_size: int = Field(default=512, ge=1, le=100_000, description="posts waiting, at most")
    deadline_ms: float = Field(default=2000.0, gt=0.0, le=600_000.0, description="per request")
    retry_after_s: int = Field(default=1, ge=1, le=3600, description="Retry-After on 503")

    max_posts_per_request: int = Field(
        default=64, ge=1, le=MAX_POSTS_CEILING, description="/route/batch"
    )
    max_images_per_post: int = Field(default=4, ge=0, le=MAX_IMAGES_CEILING)
    max_image_bytes: int = Field(default=10 * 2**20, ge=1024)
    max_image_pixels: int = Field(default=25_000_000, ge=1024)
    max_request_pixels: int = Field(
        default=100_000_000,
        ge=1024,
        description="decoded pixels of all images of one request (Pillow holds RGB in 4 bytes "
        "a pixel); the "
        "image that would pass it is a 413 too_many_pixels",
    )
    max_connections: int = Field(
        default=2048,
        ge=1,
        le=1_000_000,
        description="open connections; at the limit, idle ones (holding no request) are "
        "closed to make room for new ones",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0.0,
        le=3600.0,
        description="a connection holding no request this long (headers incomplete, or idle "
        "between requests) is closed",
    )
    keep_alive_s: float = Field(default=5.0, ge=1.0, le=3600.0, description="idle keep-alive")
    max_inflight_pixels: int = Field(
        default=400_000_000,
        ge=1024,
        description="decoded pixels held by all requests in progress (~1.5 GiB as RGB); "
        "beyond, a 503 images_busy with Retry-After",
    )
    decode_threads: int = Field(
        default=2, ge=1, le=64, description="threads decoding images (a pool of their own)"
    )
    max_text_chars: int = Field(default=10_000, ge=1, description="title / OCR text, each")
    max_body_bytes: int = Field(default=64 * 2**20, ge=1024)

    audit_rate: float = Field(
        default=0.01,
        ge=0.0,
        le=1.0,
        description="share of released decisions (a category not dispatched to) sent to that "
        "category's vertical anyway, flagged `audit` (deterministic in post_id)",
    )
    audit_rates: dict[str, float] = Field(
        default_factory=dict,
        description='per-category audit rates overriding RADAR_AUDIT_RATE, JSON: {"spam": 0.05}',
    )

    decision_log_path: Path | None = Field(
        default=Path("data/decision_log.sqlite3"),
        description="SQLite decision log that verdicts (POST /feedback) join; empty: off",
    )
    decision_log_url: SecretStr | None = Field(
        default=None,
        description="database URL of a decision log shared by every replica, used instead of "
        "RADAR_DECISION_LOG_PATH: postgresql://user:password@host:5432/db",
    )
    decision_log_retention_days: float = Field(default=30.0, gt=0.0, le=3650.0)
    decision_log_max_rows: int = Field(default=10_000_000, ge=1000, description="(post, category)")
    quality_refresh_s: float = Field(
        default=300.0,
        gt=0.0,
        le=86400.0,
        description="re-estimate online recall/precision; each refresh reads the whole window "
        "of the log (SQLite: ~1.1 s of CPU per million decisions, in this process), and the "
        "recall alert waits 30 min anyway",
    )
    quality_window_hours: float = Field(default=24.0, gt=0.0, le=24.0 * 365)
    max_verdicts_per_request: int = Field(default=10_000, ge=1, le=MAX_VERDICTS_CEILING)

    url_allowlist: list[str] = Field(default_factory=list, description="hosts image URLs may use")
    url_connect_timeout_s: float = Field(default=2.0, gt=0.0, le=60.0)
    url_read_timeout_s: float = Field(default=5.0, gt=0.0, le=120.0)
    url_fetch_timeout_s: float = Field(
        default=5.0, gt=0.0, le=120.0, description="whole fetch of one image, DNS included"
    )
    url_allow_private_networks: bool = Field(
        default=False,
        description="let allowlisted hosts resolve to private/loopback/link-local addresses "
        "(tests, a CDN inside the network); off, such URLs are refused (SSRF)",
    )

    thresholds_poll_s: float = Field(default=2.0, gt=0.0, le=3600.0)
    shutdown_timeout_s: float = Field(
        default=30.0, ge=1.0, le=3600.0, description="drain in-flight requests on SIGTERM"
    )
    shutdown_grace_s: float = Field(
        default=5.0,
        ge=0.0,
        le=600.0,
        description="after SIGTERM: readiness fails at once, requests are still served this "
        "long (load balancers stop sending), then the drain",
    )
    admin_token: SecretStr | None = Field(default=None, description="bearer token for /admin")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator(
        "decision_log_path", "decision_log_url", "shadow_thresholds_path", mode="before"
    )
    @classmethod
    def _empty_means_off(cls, value: object) -> object:
        # `RADAR_DECISION_LOG_PATH=` turns the log off; without this it would be Path(".").
        return None if value == "" else value

    @field_validator("decision_log_url")
    @classmethod
    def _supported_database(cls, value: SecretStr | None) -> SecretStr | None:
        # A field validator: the error names the variable, and it never echoes the URL (and
        # its password) back; the CLI prints only the message.
        if value is not None:
            try:
                log_url(value.get_secret_value())
            except LogLocationError as exc:
                raise ValueError(str(exc)) from exc
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        if self.deadline_ms <= self.max_wait_ms:
            raise ValueError("RADAR_DEADLINE_MS must exceed RADAR_MAX_WAIT_MS")
        bad = {name: rate for name, rate in self.audit_rates.items() if not 0 <= rate <= 1}
        if bad:
            raise ValueError(f"RADAR_AUDIT_RATES must be between 0 and 1: {bad}")
        if self.queue_size < self.max_batch_size:
            raise ValueError("RADAR_QUEUE_SIZE must be at least RADAR_MAX_BATCH_SIZE")
        return self

    @property
    def decision_log_location(self) -> Path | str | None:
        """Where the decision log lives: the shared database's URL if set, else the SQLite
        path; None: no log."""
        if self.decision_log_url is not None:
            return self.decision_log_url.get_secret_value()
        return self.decision_log_path
