"""JSON request bodies read strictly: an object with a repeated key is refused (422).

Python's `json.loads` keeps the last of repeated keys, so `{"title": "win a free cruise", ...,
"title": ""}` would be routed as a post with no text, while a logging proxy or the caller's
own parser may read the first. One body must mean one thing to everyone who reads it
(RFC 8259 §4: names "SHOULD be unique"; we make it a MUST).

FastAPI parses a body with `request.json()`; `StrictJSONRoute` hands its endpoints a request
whose `json()` refuses repeated keys. The refusal is a `ServiceError`, which FastAPI wraps in
its generic 400 "error parsing the body"; `app.service.app` answers the wrapped error instead.
"""

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from app.service.errors import ServiceError


class DuplicateKeyError(ServiceError):
    """A JSON object in the body names the same key twice."""

    status_code = 422
    code = "invalid_request"
    rejection = "invalid_request"

    def __init__(self, key: str) -> None:
        super().__init__(f"key {key!r} repeated in one JSON object: the body is ambiguous")
        self.key = key


def refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`object_pairs_hook` for `json.loads`: the object as a dict, or `DuplicateKeyError`."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKeyError(key)
            seen.add(key)
    return obj


def loads_strict(body: bytes | str) -> Any:
    """`json.loads`, refusing objects with repeated keys."""
    return json.loads(body, object_pairs_hook=refuse_duplicate_keys)


class StrictJSONRequest(Request):
    """A request whose `json()` refuses repeated keys (cached like Starlette's)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads_strict(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """An `APIRoute` whose endpoint reads its JSON body with `StrictJSONRequest`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler
