"""The Starlette application: routes, and a lifespan that owns the ledger."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import h11
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from receiver.dashboard import routes as dashboard_routes
from receiver.database import open_ledger
from receiver.dispatch import ExpiryWatch, dispatcher_for
from receiver.kling import client_for
from receiver.ledger import LedgerUnavailable
from receiver.metrics import CONTENT_TYPE, Metrics, scrape
from receiver.poller import Poller
from receiver.routes import api, callbacks, events, files
from receiver.routes._responses import BadQuery, bad_query, error, http_error
from receiver.routes.api import AdminAuth
from receiver.settings import Settings
from receiver.stats import Stats
from receiver.sweep import Sweeper
from receiver.webhooks import WebhookKey
from receiver.workers import downloader_for, sink_for

__all__ = ["create_app"]

log = logging.getLogger("receiver.app")


async def healthz(request: Request) -> Response:
    """The process is alive."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """The process can do its work: the database answers, and downloads have a place to go."""
    try:
        await request.app.state.ledger.ping()
    except LedgerUnavailable as exc:
        return JSONResponse({"status": "unavailable", "reason": str(exc)}, 503)
    downloader = request.app.state.downloader
    if downloader is not None and downloader.storage_problem is not None:
        return JSONResponse({"status": "unavailable", "reason": downloader.storage_problem}, 503)
    return JSONResponse({"status": "ready"})


async def metrics_text(scope: Scope, receive: Receive, send: Send) -> None:
    """Prometheus metrics: this process's counters, and the ledger's backlog read now."""
    request = Request(scope, receive)
    downloader = request.app.state.downloader
    ready = None if downloader is None else downloader.storage_problem is None
    body = await scrape(request.app.state.metrics, request.app.state.ledger, ready)
    await Response(body, media_type=CONTENT_TYPE)(scope, receive, send)


async def ledger_unavailable(request: Request, exc: Exception) -> Response:
    """The database could not take a request (its writer is down, say): a 503, not a 500."""
    log.error("ledger unavailable", extra={"path": request.url.path, "error": str(exc)})
    return error(
        503, "ledger_unavailable", "The ledger cannot be reached right now; try again later."
    )


async def internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return error(500, "internal_error", "Something went wrong on our side; nothing was lost.")


class FrontDoor:
    """What every HTTP request passes first: a fast lane for deliveries, and late answers.

    A callback delivery goes straight to its endpoint (`direct`), past the router and
    its exception wrappers: most requests are deliveries, and each layer costs on every
    one. An error it raises still ends in `internal_error`.

    A response to a request that uvicorn already answered itself is dropped. uvicorn's
    h11 protocol answers a request whose framing breaks mid-body (a bad
    chunk) with its own 400 and closes the connection; an endpoint that answers at
    the same moment, without reading the body (an unknown callback URL), then raises
    from `send`. Nobody can receive that response, so it is dropped, and the request
    ends once uvicorn has seen the connection close (so it logs no server error).
    """

    def __init__(
        self,
        app: ASGIApp,
        direct: Callable[[Scope], Callable[[Request], Awaitable[Response]] | None],
    ) -> None:
        self.app = app
        self.direct = direct

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        dropped = False

        async def guarded(message: Message) -> None:
            nonlocal dropped
            if dropped:
                return
            try:
                await send(message)
            except h11.LocalProtocolError:
                dropped = True
                log.debug("response dropped: the server already answered this request")

        endpoint = self.direct(scope)
        if endpoint is None:
            await self.app(scope, receive, guarded)
        else:
            response = await endpoint(Request(scope, receive, guarded))
            await response(scope, receive, guarded)
        if dropped:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    while (await receive())["type"] != "http.disconnect":
                        pass


def create_app(settings: Settings) -> Starlette:
    """Build the app for these settings; the ledger opens when the lifespan starts."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with (
            open_ledger(settings.database_url) as ledger,
            contextlib.AsyncExitStack() as stack,
            asyncio.TaskGroup() as group,
        ):
            app.state.ledger = ledger
            app.state.sink = sink_for(settings)
            background = []
            app.state.downloader = app.state.kling = app.state.poller = None
            if settings.download_concurrency:
                app.state.downloader = downloader_for(
                    settings, ledger, sink=app.state.sink, metrics=app.state.metrics
                )
                background.append(group.create_task(app.state.downloader.run(), name="downloads"))
            if settings.kling_configured:
                app.state.kling = await stack.enter_async_context(client_for(settings))
                downloader = app.state.downloader
                app.state.poller = Poller(
                    ledger,
                    app.state.kling,
                    settings,
                    on_files=downloader.wake if downloader is not None else None,
                    metrics=app.state.metrics,
                )
                background.append(group.create_task(app.state.poller.run(), name="poller"))
                if settings.sweep_interval:
                    sweeper = Sweeper(
                        ledger,
                        app.state.kling,
                        settings,
                        on_files=app.state.poller.on_files,
                        metrics=app.state.metrics,
                    )
                    background.append(group.create_task(sweeper.run(), name="sweep"))
            # The web processes of a fleet share their settings: each start makes the
            # endpoints in use the ones EVENT_WEBHOOK_URLS names.
            await ledger.set_endpoints(settings.event_endpoints)
            if settings.event_dispatch_concurrency:
                dispatcher = dispatcher_for(settings, ledger, app.state.metrics)
                background.append(group.create_task(dispatcher.run(), name="events"))
            expiry = ExpiryWatch(ledger, settings.expiry_warn_days, app.state.metrics)
            background.append(group.create_task(expiry.run(), name="expiry"))
            log.info(
                "ready",
                extra={
                    "public_url": settings.public_url,
                    "downloads": settings.download_concurrency,
                    "polling": settings.kling_configured,
                    "sweep_interval": settings.sweep_interval if settings.kling_configured else 0,
                    "verify_callbacks": settings.verify,
                    "event_endpoints": len(settings.event_endpoints),
                },
            )
            yield
            for task in background:
                task.cancel()  # downloads hand unfinished jobs back; their bytes stay
        log.info("stopped")

    app = Starlette(
        routes=[
            *callbacks.routes,  # first: the route nearly every request takes
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route(
                "/metrics",
                AdminAuth(metrics_text, token=settings.metrics_bearer, setting="METRICS_TOKEN"),
                methods=["GET"],
            ),
            *files.routes,
            Mount(
                "/api",
                routes=[*api.routes, *events.routes],
                middleware=[Middleware(AdminAuth, token=settings.secret("admin_token"))],
            ),
            *dashboard_routes(settings),  # last: its pages never shadow the routes above
        ],
        middleware=[Middleware(FrontDoor, direct=callbacks.direct)],
        exception_handlers={
            HTTPException: http_error,
            BadQuery: bad_query,
            LedgerUnavailable: ledger_unavailable,
            Exception: internal_error,
        },
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.stopping = asyncio.Event()  # set when the server begins to shut down
    app.state.stats = Stats()
    app.state.metrics = Metrics()
    secret = settings.kling_webhook_secret
    app.state.webhook = WebhookKey(secret.get_secret_value()) if secret else None
    return app
