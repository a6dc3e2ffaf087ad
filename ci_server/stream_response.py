"""An event stream as a bare ASGI response: each chunk is one `send`, in the request's own task.

Starlette's StreamingResponse (under an ASGI 2.3 server such as uvicorn) runs the body in a
second task of an anyio task group beside a disconnect listener, every chunk passing through
its task wrapper and `stream_response`. With a thousand watchers each written to a few times a
second, those layers, and the task group each joining watcher builds, were a visible share of
the replica's CPU. Here the body is iterated in the request's task and written with `send`
directly; the disconnect listener is a plain task that, when the client goes away, cancels the
request's task where it waits (for the relay, mostly), so the route's cleanup runs at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Mapping

from starlette.responses import Response
from starlette.types import Receive, Scope, Send


class EventStreamResponse(Response):
    """Writes each chunk of `chunks` as it comes; ends early, quietly, when the client leaves."""

    # status_code is a parameter (always 200 here) because FastAPI's OpenAPI generation reads
    # a response class's default status from its __init__ signature.
    def __init__(self, chunks: AsyncGenerator[bytes, None], media_type: str,
                 headers: Mapping[str, str] | None = None, status_code: int = 200,
                 on_close: Callable[[], None] | None = None) -> None:
        self.chunks = chunks
        self.on_close = on_close  # called once the stream is over, however it ended
        self.status_code = status_code
        self.media_type = media_type
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = asyncio.current_task()
        assert streaming is not None
        hung_up = False

        async def listen() -> None:
            nonlocal hung_up
            while (await receive())["type"] != "http.disconnect":
                pass
            hung_up = True
            # This runs only while the streaming task is suspended, and every await of it until
            # the listener is cancelled is inside the `try` below: the cancellation lands there.
            streaming.cancel()

        listener = asyncio.create_task(listen(), name="ci-sse-disconnect")
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not hung_up:
                raise
            streaming.uncancel()  # ours: the client left; not a cancellation of the request
        finally:
            listener.cancel()
            try:
                await self.chunks.aclose()
            finally:
                if self.on_close is not None:
                    self.on_close()
