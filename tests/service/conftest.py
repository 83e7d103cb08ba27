"""Fixtures for service tests: the real app on the tiny model, driven through ASGI."""

import base64
import io
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI
from PIL import Image

from app.service.app import create_app
from app.service.settings import Settings
from app.service.state import ServiceState


def model_version_of(store: Path) -> str:
    return json.loads((store / "router.json").read_text())["model_version"]


def categories_of(store: Path) -> list[str]:
    return json.loads((store / "router.json").read_text())["categories"]


def write_thresholds(path: Path, store: Path, version: str, tau: float | dict[str, float]) -> None:
    """Write a thresholds file atomically (write + rename), as ops tools should."""
    taus = tau if isinstance(tau, dict) else dict.fromkeys(categories_of(store), tau)
    doc = {
        "version": version,
        "model_version": model_version_of(store),
        "categories": {name: {"tau": value} for name, value in taus.items()},
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc))
    tmp.replace(path)


@pytest.fixture
def thresholds_path(tmp_path: Path, tiny_store: Path) -> Path:
    path = tmp_path / "thresholds.yaml"
    write_thresholds(path, tiny_store, "v1", 0.5)
    return path


@pytest.fixture
def make_settings(tiny_store: Path, thresholds_path: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "model_dir": tiny_store,
            "thresholds_path": thresholds_path,
            "device": "cpu",
            "thresholds_poll_s": 0.05,
            # One intra-op thread: the tests check behaviour, and on a busy shared CPU the
            # default OpenMP team stalls forwards on a fresh model thread for seconds.
            "torch_threads": 1,
            "decision_log_path": thresholds_path.parent / "decision_log.sqlite3",
        }
        values.update(overrides)
        return Settings(**values)

    return make


@asynccontextmanager
async def serve(
    app: FastAPI, raise_app_exceptions: bool = True
) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan (model load, warm-up) and give a client bound to it.

    `raise_app_exceptions=False` shows what a server sends for an unhandled error (the
    500 body) instead of re-raising the error in the test.
    """
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
        async with httpx.AsyncClient(transport=transport, base_url="http://radar") as client:
            yield client


Running = Callable[..., AbstractAsyncContextManager[tuple[httpx.AsyncClient, ServiceState]]]


@pytest.fixture
def running(make_settings: Callable[..., Settings]) -> Running:
    """`async with running(**settings) as (client, state):` a live app on the tiny model."""

    @asynccontextmanager
    async def run(**overrides: Any) -> AsyncIterator[tuple[httpx.AsyncClient, ServiceState]]:
        app = create_app(make_settings(**overrides))
        async with serve(app) as client:
            yield client, app.state.radar

    return run


def png_b64(width: int = 40, height: int = 30, color: tuple[int, int, int] = (200, 30, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def post(post_id: str, title: str = "hello", ocr: str = "", images: int = 0) -> dict[str, Any]:
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (90, 90, 90)]
    return {
        "post_id": post_id,
        "title": title,
        "ocr_text": ocr,
        "images": [{"data": png_b64(32 + 8 * i, 48, colors[i % 4])} for i in range(images)],
    }
