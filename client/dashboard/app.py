"""The operator page's web app (Starlette): the page, its JSON, its live updates, its images.

Routes: GET / (the page), GET /api/streams (every card as JSON), GET /events (server-sent
events: one `stream` event per changed card, the same JSON), GET /streams/{id}/frame.png,
overlay.png (?v=N: that thumbnail version, kept for a few seconds) and plot.png, GET
/static/* (the page's script, style and icon), GET /favicon.ico (the same icon).

Stream text (IDs, questions, answers, event messages) is untrusted: it only ever travels as
JSON and the page sets it with textContent; the Content-Security-Policy allows no inline
script, so even a bug that put stream text into HTML could not run it. A Host header check
keeps other web sites (DNS rebinding) from reading the page through a browser.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; "
     b"img-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
PING_SECONDS = 10      # SSE comment lines that keep idle connections (and proxies) open


class _SecurityHeaders:
    """Adds SECURITY_HEADERS to every response (a plain ASGI middleware: it leaves the SSE
    stream unbuffered)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                   *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, with_headers)


def build_app(board, allowed_hosts: list[str]) -> Starlette:
    """The app serving `board` (a codecsight_client.dashboard.Dashboard)."""

    async def index(request: Request):
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-store"})

    async def favicon(request: Request):   # browsers ask for it even with a <link>
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    async def streams(request: Request):
        return JSONResponse(board.snapshot(), headers={"cache-control": "no-store"})

    async def events(request: Request):
        async def stream_events():
            async for card in board.updates():
                yield {"event": "stream", "data": json.dumps(card)}
        return EventSourceResponse(stream_events(), ping=PING_SECONDS,
                                   headers={"cache-control": "no-store"})

    def image(kind: str):
        async def endpoint(request: Request):
            stream_id = request.path_params["stream_id"]
            version = request.query_params.get("v", "")
            version = int(version) if version.isdigit() and kind != "plot" else None
            # matplotlib takes tens of milliseconds: off the event loop.
            data = await asyncio.to_thread(board.image, stream_id, kind, version)
            if data is None:
                return PlainTextResponse(f"no {kind} image for stream {stream_id!r} yet",
                                         status_code=404)
            return Response(data, media_type="image/png",
                            headers={"cache-control": "no-store"})
        return endpoint

    routes = [
        Route("/", index),
        Route("/favicon.ico", favicon),
        Route("/api/streams", streams),
        Route("/events", events),
        Route("/streams/{stream_id}/frame.png", image("frame")),
        Route("/streams/{stream_id}/overlay.png", image("overlay")),
        Route("/streams/{stream_id}/plot.png", image("plot")),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, middleware=[
        Middleware(_SecurityHeaders),
        Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts),
    ])
