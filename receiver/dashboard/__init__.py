"""The web dashboard at `/`: server-rendered pages over the ledger, for the admin token's holder.

Every page but the sign-in form needs a session cookie (`session`); every form
carries a CSRF token; every answer carries a Content-Security-Policy that allows
only this service's own scripts and styles. Live updates come from the outbound
events' stream (`receiver.routes.events.stream`), reached here with the session.
"""

from __future__ import annotations

from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from receiver.dashboard import pages
from receiver.dashboard.session import Sessions
from receiver.routes import events
from receiver.settings import Settings

__all__ = ["routes"]


def routes(settings: Settings) -> list[BaseRoute]:
    """The dashboard's routes; none of them shadows /api, /callbacks, /files or the probes."""
    sessions = Sessions(
        settings.secret("admin_token"), secure=settings.public_url.startswith("https://")
    )
    signed_in = pages.SignedIn(sessions)
    return [
        Route("/", signed_in(pages.overview), methods=["GET"]),
        Route("/signin", pages.signin_form(sessions), methods=["GET"]),
        Route("/signin", pages.signin(sessions), methods=["POST"]),
        Route("/signout", signed_in(pages.signout), methods=["POST"]),
        Route("/tasks", signed_in(pages.task_list), methods=["GET"]),
        Route("/tasks/{task_id}", signed_in(pages.task_page), methods=["GET"]),
        Route("/tasks/{task_id}/retry", signed_in(pages.retry), methods=["POST"]),
        Route("/failures", signed_in(pages.failures), methods=["GET"]),
        Route("/failures/retry", signed_in(pages.bulk_retry), methods=["POST"]),
        Route("/events", signed_in(pages.event_list), methods=["GET"]),
        Route("/events/replay", signed_in(pages.replay), methods=["POST"]),
        Route("/events/{msg_id}", signed_in(pages.event_page), methods=["GET"]),
        # The same stream as /api/events/stream, for a browser that holds a session.
        Route("/live", signed_in(events.stream, page=False), methods=["GET"]),
        Mount("/static", StaticFiles(packages=[("receiver", "dashboard/static")]), name="static"),
    ]
