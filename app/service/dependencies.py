"""How every route reaches the service: one dependency, `State`.

`async` on purpose: FastAPI runs a plain `def` dependency in a worker thread, one thread hop
per request for an attribute read (a GIL convoy under load). A route then asks the state for
what it needs: `state.ready()` to route, `state.started()` for the parts alone (admin,
feedback), each a `NotReadyError` (503) until there.
"""

from typing import Annotated

from fastapi import Depends, Request

from app.service.state import ServiceState


async def get_state(request: Request) -> ServiceState:
    return request.app.state.radar


State = Annotated[ServiceState, Depends(get_state)]
