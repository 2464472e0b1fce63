"""durably's HTTP API and live dashboard (``pip install durably[web]``).

``create_app(durably)`` returns a Starlette ASGI app to serve on its own
(``durably serve``) or to mount in any ASGI framework::

    fastapi_app.mount("/durably", create_app(durably))
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from durably._engine import Durably
from durably.errors import ConfigurationError, DurablyError
from durably.web._api import STATUS_CODES, Api, error_response
from durably.web._changes import ChangeFeed

__all__ = ["Auth", "create_app"]

Auth = Callable[[HTTPConnection], "bool | Awaitable[bool]"]
_STATIC = Path(__file__).parent / "static"
_UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class _Guard:
    """Asks ``auth`` about every request, and refuses state changes that are not JSON.

    Requiring ``application/json`` keeps plain HTML forms of other sites (CSRF) out:
    a browser sends that content type across origins only after a CORS preflight.
    """

    def __init__(self, app: ASGIApp, auth: Auth | None) -> None:
        self._app = app
        self._auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan; the app has no websocket routes
            await self._app(scope, receive, send)
            return
        connection = HTTPConnection(scope)
        refusal = await self._refusal(connection)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self._app(scope, receive, send)

    async def _refusal(self, connection: HTTPConnection) -> Response | None:
        if self._auth is not None:
            allowed = self._auth(connection)
            if inspect.isawaitable(allowed):
                allowed = await allowed
            if allowed is not True:
                return error_response(401, "Unauthorized", "authentication required")
        method = connection.scope.get("method", "GET")
        content_type = connection.headers.get("content-type", "").split(";")[0].strip().lower()
        if method in _UNSAFE_METHODS and content_type != "application/json":
            return error_response(
                400, "BadRequest", f"{method} requests must have Content-Type: application/json"
            )
        return None


async def _durably_error(request: Request, exc: Exception) -> Response:
    status = next((code for kind, code in STATUS_CODES.items() if isinstance(exc, kind)), 400)
    return error_response(status, type(exc).__name__, str(exc))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = "NotFoundError" if exc.status_code == 404 else "HTTPError"
    return error_response(exc.status_code, kind, str(exc.detail))


async def _index(request: Request) -> Response:
    # Relative URLs in the page need the trailing slash (mounted at /durably, it is /durably/).
    if not request.url.path.endswith("/"):
        return RedirectResponse(request.url.replace(path=request.url.path + "/"), status_code=308)
    return FileResponse(_STATIC / "index.html", headers={"Cache-Control": "no-cache"})


def create_app(durably: Durably, *, auth: Auth | None = None, dashboard: bool = True) -> Starlette:
    """An ASGI app serving SPEC §13's API (and the dashboard at ``/`` unless ``dashboard=False``).

    ``auth(connection)`` returns a bool, or an awaitable of one; a request it denies
    gets 401. Each app keeps its own state, so several can be mounted side by side.
    """
    if not isinstance(durably, Durably):
        raise ConfigurationError(f"create_app() takes a Durably instance, got {type(durably).__name__}")
    if auth is not None and not callable(auth):
        raise ConfigurationError("auth must be a callable taking the request and returning a bool")
    feed = ChangeFeed(durably)
    routes: list[Any] = Api(durably, feed).routes()
    if dashboard:
        routes += [Route("/", _index), Mount("/static", StaticFiles(directory=_STATIC), name="static")]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(_Guard, auth=auth)],
        exception_handlers={DurablyError: _durably_error, HTTPException: _http_error},
    )
    app.state.durably = durably
    app.state.feed = feed
    return app
