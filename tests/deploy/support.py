"""Helpers of the deployment checks: repository paths, external tools, the dashboard's PromQL.

The checks run without a container engine. They call a few external tools (hadolint,
promtool, prometheus); a test skips when one is missing, unless RADAR_REQUIRE_DEPLOY_TOOLS=1
(CI, scripts/check_deploy.sh) makes a missing tool a failure, so that CI cannot go green by
skipping them.
"""

import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "radar.json"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
K8S_DIR = REPO / "deploy" / "k8s"

# Labels Prometheus attaches to every scraped series itself.
TARGET_LABELS = frozenset({"instance", "job"})


def require_tool(name: str, optional: bool = False) -> str:
    """The path of executable `name` (PATH or beside this Python); skip or fail without it.

    An `optional` tool only ever skips: its check adds to the required ones.
    """
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found:
        return found
    reason = f"{name} not installed (scripts/install_system_deps.sh, or the dev extras)"
    if optional:
        reason = f"{name} not installed (optional)"
    if os.environ.get("RADAR_REQUIRE_DEPLOY_TOOLS") == "1" and not optional:
        pytest.fail(f"RADAR_REQUIRE_DEPLOY_TOOLS=1 but {reason}")
    pytest.skip(reason)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


# What a required variable (`${VAR:?message}`) stands for in the checks.
OPERATOR_SECRET = "set-by-the-operator"


def compose_defaults(value: str) -> str:
    """A compose value with each `${VAR:-default}` replaced by its default (VAR unset), and
    each required `${VAR:?message}` by OPERATOR_SECRET."""
    value = re.sub(r"\$\{\w+:\?[^}]*\}", OPERATOR_SECRET, value)
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


# --- the dashboard's queries -------------------------------------------------------------

# Grafana's built-in interval variables, replaced by a concrete duration so that Prometheus
# (and promtool) can parse the expression; any other `$var` is a label-matcher regex.
GRAFANA_DURATIONS = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h"}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    found = []
    for panel in panels(board):
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for variable in board.get("templating", {}).get("list", []):
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            found.append((f"variable {variable['name']!r}", label_values_selector(text)))
    return found


def label_values_selector(query: str) -> str:
    """`label_values(metric, label)` (Grafana's variable query) to the PromQL `metric`."""
    match = re.fullmatch(r"\s*label_values\(\s*(.+?)\s*,\s*\w+\s*\)\s*", query)
    return match.group(1) if match else query


def substitute(expr: str, durations: dict[str, str] | None = None) -> str:
    """Replace Grafana's variables so that the expression is plain PromQL."""
    durations = {**GRAFANA_DURATIONS, **(durations or {})}

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return durations.get(name, ".*")

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", replace, expr)


_AFTER_FUNCTION = re.compile(r"\s*\(")
_CLAUSE = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_MATCHERS = re.compile(r"\{([^}]*)\}")
_IDENTIFIER = re.compile(r"(?<![\w.:])[a-zA-Z_:][\w:]*")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"})


def metric_names(expr: str) -> set[str]:
    """Metric names selected in a PromQL expression (functions, labels, keywords left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', substitute(expr))  # strings first: they hold }
    text = _CLAUSE.sub(" ", _MATCHERS.sub(" ", re.sub(r"\[[^\]]*\]", " ", text)))
    names = set()
    for match in _IDENTIFIER.finditer(text):
        is_call = _AFTER_FUNCTION.match(text, match.end()) is not None
        if not is_call and match.group() not in _KEYWORDS:
            names.add(match.group())
    return names


def label_names(expr: str) -> set[str]:
    """Label names used in matchers and in by / without / on / ignoring clauses."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', substitute(expr))
    labels = set()
    for body in _MATCHERS.findall(text):
        labels.update(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", body))
    for _, body in _CLAUSE.findall(text):
        labels.update(name.strip() for name in body.split(",") if name.strip())
    return labels


def undefined_in(expr: str, exported: dict[str, set[str] | None]) -> list[str]:
    """What `expr` uses that the service does not export: unknown metrics or labels.

    `exported` maps each sample name to its label names, or None where the family had no
    sample yet (its labels are unknown, so any label passes for it).
    """
    problems = [f"metric {name}" for name in sorted(metric_names(expr)) if name not in exported]
    known: set[str] = set(TARGET_LABELS)
    for name in metric_names(expr):
        labels = exported.get(name, set())
        if labels is None:
            return problems
        known |= labels
    problems += [f"label {name}" for name in sorted(label_names(expr) - known)]
    return problems
