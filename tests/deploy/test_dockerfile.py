"""The Dockerfile, checked without a container engine: lint, layer order, context, healthcheck."""

import fnmatch
import http.server
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from app.cli import build_parser
from app.service.app import create_app
from app.service.settings import Settings
from benchmarks.loadgen import free_port
from tests.deploy.support import REPO, require_tool

DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    lines = [
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")
    ]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    found = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def stage(name: str) -> list[tuple[str, str]]:
    """The instructions of the stage `FROM ... AS name`."""
    current: str | None = None
    picked = []
    for keyword, rest in instructions():
        if keyword == "FROM":
            current = rest.split()[-1] if " AS " in rest.upper() else None
        elif current == name:
            picked.append((keyword, rest))
    return picked


def test_hadolint_finds_nothing() -> None:
    hadolint = require_tool("hadolint")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_dependencies_are_installed_before_the_code_is_copied() -> None:
    build = stage("build")
    copies = [rest for keyword, rest in build if keyword == "COPY"]
    assert copies[0].startswith("pyproject.toml")
    assert copies[1].startswith("app ")
    deps_at = next(i for i, (k, r) in enumerate(build) if k == "RUN" and ".[encoders,int8]" in r)
    code_at = build.index(("COPY", copies[1]))
    torch_at = next(i for i, (k, r) in enumerate(build) if k == "RUN" and "torch==" in r)
    assert torch_at < deps_at < code_at


def test_torch_wheel_follows_the_variant_build_arg() -> None:
    build = stage("build")
    assert ("ARG", "TORCH_VARIANT=cpu") in build
    (torch_run,) = [rest for keyword, rest in build if keyword == "RUN" and "torch==" in rest]
    assert "/whl/${TORCH_VARIANT}" in torch_run


def test_runtime_runs_as_a_numeric_non_root_user_with_radar_serve() -> None:
    runtime = dict(stage("runtime"))
    user = runtime["USER"].split(":")[0]
    assert user.isdigit()
    assert int(user) != 0
    entry = json.loads(runtime["ENTRYPOINT"]) + json.loads(runtime["CMD"])
    assert entry == ["radar", "serve"]
    build_parser().parse_args(entry[1:])  # a command the CLI knows


def dockerignore_allows(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    allowed = True
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes):
            allowed = negate
    return allowed


def test_build_context_holds_what_the_dockerfile_copies_and_no_checkpoints() -> None:
    sources = [
        rest.split()[:-1]
        for keyword, rest in instructions()
        if keyword == "COPY" and "--from=" not in rest
    ]
    for source in (s for group in sources for s in group if not s.startswith("--")):
        assert dockerignore_allows(source), source
        assert (REPO / source).exists(), source
    assert dockerignore_allows("app/service/app.py")
    for kept_out in ("model_store/tiny/head.safetensors", ".venv/bin/python", ".git/HEAD"):
        assert not dockerignore_allows(kept_out), kept_out


def healthcheck_command() -> list[str]:
    (healthcheck,) = [rest for keyword, rest in stage("runtime") if keyword == "HEALTHCHECK"]
    assert "CMD [" in healthcheck
    return json.loads(healthcheck.split("CMD", 1)[1])


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 503)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[int]:
    """A loopback stand-in answering 200 on /healthz only, like the service."""
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def run_healthcheck(port: int) -> int:
    command = healthcheck_command()
    assert command[0] == "python"
    env = {**os.environ, "RADAR_PORT": str(port)}
    return subprocess.run([sys.executable, *command[1:]], env=env, timeout=30).returncode


def test_healthcheck_probes_healthz_on_the_configured_port(health_server: int) -> None:
    assert run_healthcheck(health_server) == 0
    assert run_healthcheck(free_port()) != 0  # nothing listening: unhealthy


def test_the_service_answers_the_healthcheck_path() -> None:
    paths = create_app(Settings()).openapi()["paths"]
    assert {"/healthz", "/readyz", "/metrics"} <= set(paths)


def test_baked_tiny_model_is_opened_to_the_runtime_user() -> None:
    # safetensors writes 0600 files as the build's root; uid 10001 could not load them.
    (bake,) = [rest for keyword, rest in stage("build") if "make-tiny-model" in rest]
    assert "chmod -R a+rX /opt/radar/tiny" in bake
