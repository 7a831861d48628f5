"""The baseline of the endpoint benchmark: a bare Litestar route that echoes a JSON body.

Served by the same uvicorn configuration as ``retention serve`` (httptools, uvloop, one worker,
no access log), so the ratio isolates the cost of our request path.
"""

from __future__ import annotations

from litestar import Litestar, MediaType, Request, Response, post


@post("/echo")
async def echo(request: Request) -> Response[bytes]:  # type: ignore[type-arg]
    return Response(content=await request.body(), media_type=MediaType.JSON)


app = Litestar(route_handlers=[echo], openapi_config=None)
