"""Every RADAR_* variable the deployment files set is a real setting with a valid value.

pydantic-settings ignores unknown variables, so a misspelled one (RADAR_THRESHOLD_PATH)
would silently leave the default in place; this catches it before a deploy does.
"""

import os
import re
from typing import Any

import pytest

from app.service.settings import Settings
from tests.deploy.support import K8S_DIR, REPO, compose_defaults, load_yaml, load_yaml_documents


def dockerfile_env() -> dict[str, str]:
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    pairs: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            pairs.update(item.split("=", 1) for item in line.split()[1:] if "=" in item)
    return pairs


def compose_env(name: str) -> dict[str, str]:
    router = load_yaml(REPO / name)["services"]["router"]
    return {k: compose_defaults(str(v)) for k, v in router.get("environment", {}).items()}


def k8s_container_env() -> list[dict[str, Any]]:
    docs = load_yaml_documents(K8S_DIR / "deployment.yaml")
    (container,) = docs[0]["spec"]["template"]["spec"]["containers"]
    return list(container["env"])


def k8s_env() -> dict[str, str]:
    """The literal values (those from a Secret are checked on their own)."""
    return {item["name"]: item["value"] for item in k8s_container_env() if "value" in item}


def test_k8s_variables_from_secrets_are_settings_and_optional() -> None:
    """A pod must start without the Secret (each pod then keeps its own SQLite log)."""
    fields = {"RADAR_" + name.upper() for name in Settings.model_fields}
    from_secrets = [item for item in k8s_container_env() if "valueFrom" in item]
    assert [item["name"] for item in from_secrets] == ["RADAR_DECISION_LOG_URL"]
    for item in from_secrets:
        assert item["name"] in fields
        assert item["valueFrom"]["secretKeyRef"]["optional"] is True


SOURCES: dict[str, Any] = {
    "Dockerfile": dockerfile_env,
    "docker-compose.yml": lambda: {**dockerfile_env(), **compose_env("docker-compose.yml")},
    "docker-compose.gpu.yml": lambda: {
        **dockerfile_env(),
        **compose_env("docker-compose.yml"),
        **compose_env("docker-compose.gpu.yml"),
    },
    "docker-compose.shared-log.yml": lambda: {
        **dockerfile_env(),
        **compose_env("docker-compose.yml"),
        **compose_env("docker-compose.shared-log.yml"),
    },
    "deploy/k8s/deployment.yaml": lambda: {**dockerfile_env(), **k8s_env()},
}


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_radar_variables_are_settings_and_validate(
    source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    radar = {k: v for k, v in SOURCES[source]().items() if k.startswith("RADAR_")}
    fields = {"RADAR_" + name.upper() for name in Settings.model_fields}
    assert set(radar) - fields == set()
    for name in [k for k in os.environ if k.startswith("RADAR_")]:
        monkeypatch.delenv(name)
    for name, value in radar.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert str(settings.thresholds_path) == radar["RADAR_THRESHOLDS_PATH"]
    assert settings.host == "0.0.0.0"  # noqa: S104 - reachable from outside the container
