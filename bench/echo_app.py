"""The baselines of the endpoint benchmark: bare Litestar routes that echo a JSON body.

``/echo`` returns the raw body bytes; ``/echo-json`` is what a Litestar user writes (the body decoded into
a dict by Litestar and encoded back). Served by the same uvicorn configuration as ``retention serve``
(httptools, uvloop, one worker, no access log), so the ratio isolates the cost of our request path.
"""

from __future__ import annotations

from typing import Any

from litestar import Litestar, MediaType, Request, Response, post


@post("/echo")
async def echo(request: Request) -> Response[bytes]:  # type: ignore[type-arg]
    return Response(content=await request.body(), media_type=MediaType.JSON)


@post("/echo-json")
async def echo_json(data: dict[str, Any]) -> dict[str, Any]:
    return data


app = Litestar(route_handlers=[echo, echo_json], openapi_config=None)
