"""Property-based fuzzing of the OpenAPI document with schemathesis, against a real uvicorn
server on the tiny model: every operation, valid and invalid inputs, never a 5xx, and every
response (errors included) as the document describes it.

Bounded for CI: `MAX_EXAMPLES` generated cases per operation (plus schemathesis' explicit
and coverage cases). `positive_data_acceptance` is off on purpose: data the schema allows
can still be refused by design (an image field holding base64 of a non-image, a title over
`RADAR_MAX_TEXT_CHARS`), and that 422 is documented. Invalid data may also be refused with
413 (a generated body over `RADAR_MAX_BODY_BYTES`), which schemathesis does not expect by
default.
"""

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import positive_data_acceptance

from app.service.app import create_app
from app.service.settings import Settings
from tests.service.conftest import write_thresholds
from tests.service.live import server_thread

MAX_EXAMPLES = 30

# The document is the app's own; building the app loads nothing (that is the lifespan's job).
REJECTIONS = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429]
schema = schemathesis.openapi.from_dict(
    create_app(Settings()).openapi(),
    config=SchemathesisConfig.from_dict(
        {"checks": {"negative_data_rejection": {"expected-statuses": REJECTIONS}}}
    ),
)


@pytest.fixture(scope="module")
def base_url(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    thresholds = tmp_path_factory.mktemp("fuzz") / "thresholds.yaml"
    write_thresholds(thresholds, tiny_store, "fuzz-1", 0.5)
    live = Settings(
        model_dir=tiny_store,
        thresholds_path=thresholds,
        device="cpu",
        torch_threads=1,
        admin_token="fuzz-token",
        max_body_bytes=256 * 1024,
    )
    with server_thread(live) as url:
        yield url


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


@pytest.fixture(scope="module")
def tally() -> Iterator[Counter[str]]:
    """Cases sent per status class; printed at the end (`pytest -s`) for the issue's figures."""
    counts: Counter[str] = Counter()
    yield counts
    print(f"\nschemathesis: {sum(counts.values())} cases, by status class {dict(counts)}")


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,  # no .hypothesis/ directory in the checkout
    derandomize=True,  # CI runs the same cases every time; a failure reproduces
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_answers_as_documented(
    case: schemathesis.Case, base_url: str, session: requests.Session, tally: Counter[str]
) -> None:
    response = case.call_and_validate(
        base_url=base_url,
        session=session,
        timeout=30,
        excluded_checks=[positive_data_acceptance],
    )
    tally[f"{response.status_code // 100}xx"] += 1
    assert response.status_code < 500
    assert "Traceback" not in response.text
