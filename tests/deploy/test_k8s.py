"""Kubernetes manifests: the Kubernetes schemas (offline, kubernetes-validate) and consistency."""

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from app.thresholds import parse_thresholds, validate_for_model
from tests.deploy.support import K8S_DIR, REPO, load_yaml_documents

# The oldest Kubernetes still in common support and the newest the schemas know.
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
MANIFESTS = sorted(K8S_DIR.glob("*.yaml"))


def resources() -> dict[str, dict[str, Any]]:
    """Every manifest's resource by kind (one of each kind here)."""
    found: dict[str, dict[str, Any]] = {}
    for path in MANIFESTS:
        for doc in load_yaml_documents(path):
            assert doc["kind"] not in found, f"second {doc['kind']} in {path.name}"
            found[doc["kind"]] = doc
    return found


def container() -> dict[str, Any]:
    (router,) = resources()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return router


def env() -> dict[str, str]:
    """Literal values; those from a Secret: tests/deploy/test_env_vars.py."""
    return {item["name"]: item["value"] for item in container()["env"] if "value" in item}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_the_kubernetes_schema(path: Path, version: str) -> None:
    for doc in load_yaml_documents(path):
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_schema_check_rejects_a_misplaced_field() -> None:
    deployment = resources()["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def test_expected_resources_exist() -> None:
    kinds = set(resources())
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"} <= kinds


def test_probes_use_readyz_and_healthz_on_the_served_port() -> None:
    router = container()
    (port,) = router["ports"]
    assert router["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    assert router["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert router["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert port["containerPort"] == int(env()["RADAR_PORT"])
    annotations = resources()["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == env()["RADAR_PORT"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert env()["RADAR_HOST"] == "0.0.0.0"  # noqa: S104 - the pod must accept the Service


def test_service_hpa_and_pdb_select_the_deployment() -> None:
    found = resources()
    deployment = found["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        selector = found[kind]["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert selector.items() <= pod_labels.items(), kind
    (service_port,) = found["Service"]["spec"]["ports"]
    assert service_port["targetPort"] == container()["ports"][0]["name"]
    target = found["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert found["HorizontalPodAutoscaler"]["spec"]["minReplicas"] >= 2


def test_pod_runs_as_the_images_non_root_user() -> None:
    pod = resources()["Deployment"]["spec"]["template"]["spec"]
    dockerfile_user = next(
        line.split()[1]
        for line in (REPO / "Dockerfile").read_text().splitlines()
        if line.startswith("USER ")
    )
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == dockerfile_user.split(":")[0]
    security = container()["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    tmp = next(m for m in container()["volumeMounts"] if m["mountPath"] == "/tmp")  # noqa: S108
    assert tmp["name"] in {v["name"] for v in pod["volumes"] if "emptyDir" in v}


def test_thresholds_come_from_the_configmap_as_a_directory_mount(tiny_store: Path) -> None:
    found = resources()
    pod = found["Deployment"]["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if "configMap" in v)
    assert volume["configMap"]["name"] == found["ConfigMap"]["metadata"]["name"]
    mount = next(m for m in container()["volumeMounts"] if m["name"] == volume["name"])
    assert "subPath" not in mount  # a subPath mount never receives ConfigMap updates
    path = Path(env()["RADAR_THRESHOLDS_PATH"])
    assert path.parent == Path(mount["mountPath"])
    text = found["ConfigMap"]["data"][path.name]
    config = json.loads((tiny_store / "router.json").read_text())
    parsed = parse_thresholds(text.encode(), path.name)
    validate_for_model(parsed, config["categories"], config["model_version"], path.name, "")
