"""Settings: RADAR_* environment variables, refused at start-up when unsafe."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.service.settings import Settings


def test_environment_overrides(monkeypatch) -> None:
    monkeypatch.setenv("RADAR_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("RADAR_URL_ALLOWLIST", '["cdn.example"]')
    settings = Settings()
    assert settings.max_batch_size == 16
    assert settings.url_allowlist == ["cdn.example"]


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("RADAR_MAX_BATCH_SIZE", "0"),
        ("RADAR_QUEUE_SIZE", "-5"),
        ("RADAR_DEVICE", "tpu"),
        ("RADAR_DEADLINE_MS", "abc"),
    ],
)
def test_bad_values_are_refused(monkeypatch, env: str, value: str) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ValidationError):
        Settings()


def test_inconsistent_values_are_refused() -> None:
    with pytest.raises(ValidationError, match="RADAR_DEADLINE_MS"):
        Settings(deadline_ms=5, max_wait_ms=10)
    with pytest.raises(ValidationError, match="RADAR_QUEUE_SIZE"):
        Settings(queue_size=4, max_batch_size=8)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def test_serve_names_a_bad_variable_and_exits_2(tmp_path) -> None:
    env = {**os.environ, "RADAR_MAX_BATCH_SIZE": "0"}
    result = run_cli("serve", env=env)
    assert result.returncode == 2
    assert "RADAR_MAX_BATCH_SIZE" in result.stderr


def test_serve_names_a_missing_model_store_and_exits_2(tmp_path) -> None:
    result = run_cli("serve", "--model-dir", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert "nowhere" in result.stderr and "router.json" in result.stderr


def test_help_for_every_command() -> None:
    for command in ("serve", "make-tiny-model"):
        result = run_cli(command, "--help")
        assert result.returncode == 0 and "usage: radar" in result.stdout


def test_an_empty_path_turns_the_decision_log_and_the_shadow_off(monkeypatch) -> None:
    monkeypatch.setenv("RADAR_DECISION_LOG_PATH", "")
    monkeypatch.setenv("RADAR_SHADOW_THRESHOLDS_PATH", "")
    settings = Settings()
    assert settings.decision_log_path is None and settings.shadow_thresholds_path is None
    monkeypatch.setenv("RADAR_DECISION_LOG_PATH", "/var/lib/radar/log.sqlite3")
    assert Settings().decision_log_path == Path("/var/lib/radar/log.sqlite3")
