"""The dashboard's pages and forms: each reads the ledger, renders a template, or acts and
redirects back (POST, then a 303, so a reload never repeats an action)."""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from receiver._clock import parse_time, utc_in
from receiver._redact import redact_url
from receiver.dashboard.session import (
    SESSION_COOKIE,
    SESSION_SECONDS,
    SIGNIN_COOKIE,
    SIGNIN_SECONDS,
    Sessions,
)
from receiver.events import EVENT_TYPES, BadReplay, replay_request
from receiver.ledger import PROBLEM_STATES, Ledger
from receiver.models import AssetKind, AssetRecord, AssetState, TaskRecord, TaskStatus
from receiver.routes.api import requeue, signed_link
from receiver.routes.events import outbound_json

__all__ = [
    "SignedIn",
    "bulk_retry",
    "event_list",
    "event_page",
    "failures",
    "overview",
    "replay",
    "retry",
    "signin",
    "signin_form",
    "signout",
    "task_list",
    "task_page",
]

Handler = Callable[[Request], Awaitable[Response]]

# Signed links in previews last this long: a page left open for an hour still plays.
PREVIEW_SECONDS = 3600
PAGE = 50

_templates = Environment(
    loader=PackageLoader("receiver", "dashboard/templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)


def _http_only(url: str | None) -> str | None:
    """A URL from the ledger as a link target, only when it is http(s): never `javascript:`."""
    return url if url and url.lower().startswith(("http://", "https://")) else None


def _size(value: int | None) -> str:
    if value is None:
        return ""
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _ago(stamp: str | None) -> str:
    """How long ago an ISO time was (or how far ahead), in the largest whole unit."""
    if not stamp:
        return ""
    seconds = time.time() - parse_time(stamp).timestamp()
    return _span(seconds) + (" ago" if seconds >= 0 else " from now")


def _span(seconds: float) -> str:
    seconds = abs(seconds)
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= length:
            return f"{int(seconds // length)} {unit}"
    return f"{int(seconds)} s"


_templates.filters.update(http_only=_http_only, size=_size, ago=_ago)


def _csp(media: Iterable[str] = ()) -> str:
    """Only this service's scripts, styles and connections; previews also from the origins of
    their signed links (a bucket's, for S3)."""
    sources = " ".join(["'self'", *sorted(set(media))])
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        f"img-src {sources}; media-src {sources}; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    )


def render(
    request: Request,
    template: str,
    status_code: int = 200,
    media: Iterable[str] = (),
    **context: Any,
) -> HTMLResponse:
    """A page: the template with the session's CSRF token, and the headers every page has."""
    nonce = getattr(request.state, "session", None)
    sessions: Sessions | None = getattr(request.state, "sessions", None)
    csrf = sessions.csrf(nonce) if sessions is not None and nonce is not None else ""
    body = _templates.get_template(template).render(
        request=request, csrf=csrf, signed_in=nonce is not None, **context
    )
    response = HTMLResponse(body, status_code)
    _protect(response, media)
    return response


def _protect(response: Response, media: Iterable[str] = ()) -> None:
    response.headers["content-security-policy"] = _csp(media)
    response.headers["x-frame-options"] = "DENY"
    response.headers["x-content-type-options"] = "nosniff"
    # Pages hold signed links; no other site learns them from a Referer.
    response.headers["referrer-policy"] = "no-referrer"
    response.headers["cache-control"] = "no-store"


def _redirect(path: str, **query: object) -> RedirectResponse:
    shown = {key: value for key, value in query.items() if value not in (None, "")}
    response = RedirectResponse(path + ("?" + urlencode(shown) if shown else ""), 303)
    _protect(response)
    return response


class SignedIn:
    """Wraps an endpoint so it answers only within a session; a POST also needs the form's
    CSRF token. Without a session a page redirects to the sign-in form; anything else is
    refused with 401."""

    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions

    def __call__(self, endpoint: Handler, *, page: bool = True) -> Handler:
        sessions = self.sessions

        async def guarded(request: Request) -> Response:
            nonce = sessions.open("session", request.cookies.get(SESSION_COOKIE))
            if nonce is None:
                if page and request.method == "GET":
                    query = request.url.query
                    return _redirect(
                        "/signin", next=request.url.path + (f"?{query}" if query else "")
                    )
                return _refused(request, "Sign in with the admin token first.", 401)
            request.state.session, request.state.sessions = nonce, sessions
            if request.method == "POST":
                form = await read_form(request)
                request.state.form = form
                if not sessions.csrf_ok(nonce, form.get("csrf")):
                    return _refused(request, "This form is stale; reload the page.", 403)
            return await endpoint(request)

        return guarded


# Dashboard forms are a few short fields; a larger body is no form of ours.
MAX_FORM_BYTES = 64 * 1024


async def read_form(request: Request) -> FormData:
    """An url-encoded form (all the dashboard sends), read without python-multipart; any
    other body reads as an empty form, which every check then refuses."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        return FormData()
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return FormData()
    text = body.decode("utf-8", "replace")
    fields: list[tuple[str, str | UploadFile]] = []
    try:
        fields += parse_qsl(text, keep_blank_values=True, max_num_fields=1000)
    except ValueError:  # more fields than any form of ours has
        return FormData()
    return FormData(fields)


def _refused(request: Request, message: str, status_code: int) -> Response:
    return render(request, "refused.html", status_code, message=message)


def _ledger(request: Request) -> Ledger:
    ledger: Ledger = request.app.state.ledger
    return ledger


def _form(request: Request) -> FormData:
    form: FormData = request.state.form
    return form


async def _live(request: Request, task_id: str | None = None) -> str:
    """The stream a page listens to, from the newest event before the page is read: an event
    written while the page renders, or before its script connects, still refreshes it."""
    newest = await _ledger(request).outbound_events(limit=1)
    query = {"after": str(newest[0].id if newest else 0)}
    if task_id is not None:
        query["task_id"] = task_id
    return "/live?" + urlencode(query)


# -- signing in --------------------------------------------------------------------


def _safe_next(path: object) -> str:
    """Where to go after signing in: a path of this service only, never another site."""
    if isinstance(path, str) and path.startswith("/") and not path.startswith("//"):
        if "\\" not in path and not urlsplit(path).netloc:
            return path
    return "/"


def signin_form(sessions: Sessions) -> Handler:
    async def show(request: Request) -> Response:
        return _signin_page(request, sessions, request.query_params.get("next"))

    return show


def _signin_page(
    request: Request, sessions: Sessions, after: object, error: str | None = None
) -> Response:
    pending = sessions.issue("signin", SIGNIN_SECONDS)
    nonce = sessions.open("signin", pending)
    assert nonce is not None
    response = render(
        request,
        "signin.html",
        401 if error else 200,
        error=error,
        next=_safe_next(after),
        signin_csrf=sessions.csrf(nonce),
    )
    _cookie(response, sessions, SIGNIN_COOKIE, pending, SIGNIN_SECONDS)
    return response


def signin(sessions: Sessions) -> Handler:
    async def check(request: Request) -> Response:
        form = await read_form(request)
        nonce = sessions.open("signin", request.cookies.get(SIGNIN_COOKIE))
        if nonce is None or not sessions.csrf_ok(nonce, form.get("csrf")):
            return _signin_page(request, sessions, form.get("next"), "The form expired; again.")
        token = form.get("token")
        if not isinstance(token, str) or not sessions.is_admin_token(token):
            return _signin_page(
                request, sessions, form.get("next"), "That is not the admin token (ADMIN_TOKEN)."
            )
        response = _redirect(_safe_next(form.get("next")))
        value = sessions.issue("session", SESSION_SECONDS)
        _cookie(response, sessions, SESSION_COOKIE, value, SESSION_SECONDS)
        response.delete_cookie(SIGNIN_COOKIE, path="/")
        return response

    return check


def _cookie(response: Response, sessions: Sessions, name: str, value: str, seconds: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=seconds,
        path="/",
        httponly=True,
        samesite="strict",
        secure=sessions.secure,
    )


async def signout(request: Request) -> Response:
    response = _redirect("/signin")
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


# -- overview --------------------------------------------------------------------------


async def overview(request: Request) -> Response:
    ledger = _ledger(request)
    live = await _live(request)
    backlog = await ledger.backlog()
    activity = await ledger.activity(utc_in(-3600))
    downloader = request.app.state.downloader
    storage = (
        "this process does not download (DOWNLOAD_CONCURRENCY=0)"
        if downloader is None
        else downloader.storage_problem or "ready"
    )
    expires = None
    if backlog.expires_at is not None:
        expires = datetime.datetime.fromtimestamp(backlog.expires_at, datetime.UTC)
    return render(
        request,
        "overview.html",
        live=live,
        backlog=backlog,
        activity=activity,
        chart=_chart(activity.per_minute),
        storage=storage,
        storage_ready=downloader is None or downloader.storage_problem is None,
        expires=expires.strftime("%Y-%m-%dT%H:%M:%SZ") if expires else None,
        expires_in=_span(backlog.expires_at - time.time()) if backlog.expires_at else None,
        expired=backlog.expires_at is not None and backlog.expires_at < time.time(),
        endpoints=[(redact_url(e.url), e) for e in activity.endpoints],
        statuses=["submitted", "processing", "succeed", "failed", "unknown"],
    )


def _chart(per_minute: list[tuple[str, int]]) -> dict[str, Any]:
    """Bars for the last 60 minutes, as SVG attributes (CSP forbids inline styles)."""
    counts = dict(per_minute)
    now = time.time()
    minutes = [
        time.strftime("%Y-%m-%dT%H:%M", time.gmtime(now - 60 * back)) for back in range(59, -1, -1)
    ]
    top = max([counts.get(m, 0) for m in minutes] + [1])
    bars = []
    for n, minute in enumerate(minutes):
        count = counts.get(minute, 0)
        height = round(56 * count / top)
        bars.append({"x": n * 6, "y": 60 - height, "height": height, "minute": minute, "n": count})
    return {"bars": bars, "top": top, "total": sum(counts.get(m, 0) for m in minutes)}


# -- tasks ----------------------------------------------------------------------------


class _Bad(ValueError):
    """A filter the list cannot use; shown above the list."""


def _day(text: str, *, end: bool) -> str | None:
    """A date filter (YYYY-MM-DD) as the ledger's time; `end` is the next day's start."""
    if not text:
        return None
    try:
        day = datetime.date.fromisoformat(text)
    except ValueError:
        raise _Bad("Dates are written YYYY-MM-DD.") from None
    if end:
        day += datetime.timedelta(days=1)
    return f"{day.isoformat()}T00:00:00.000Z"


def _choice(value: str, choices: dict[str, bool]) -> bool | None:
    if value and value not in choices:
        raise _Bad("Choose yes, no or either.")
    return choices.get(value)


async def task_list(request: Request) -> Response:
    query = request.query_params
    filters = {
        name: (query.get(name) or "").strip()
        for name in ("q", "status", "action", "archived", "flagged", "since", "until")
    }
    yes_no = {"yes": True, "no": False}
    problem, page = None, None
    live = await _live(request)
    try:
        if filters["status"] and filters["status"] not in TaskStatus.__members__:
            raise _Bad("Unknown status.")
        page = await _ledger(request).tasks(
            status=TaskStatus(filters["status"]) if filters["status"] else None,
            action=filters["action"] or None,
            archived=_choice(filters["archived"], yes_no),
            flagged=_choice(filters["flagged"], yes_no),
            since=_day(filters["since"], end=False),
            until=_day(filters["until"], end=True),
            search=filters["q"] or None,
            cursor=query.get("cursor") or None,
            limit=PAGE,
        )
    except ValueError as exc:  # _Bad, or a cursor this service did not write
        problem = str(exc) if isinstance(exc, _Bad) else "That page link is not valid."
    kept = {key: value for key, value in filters.items() if value}
    older = None
    if page is not None and page.next_cursor:
        older = "/tasks?" + urlencode(kept | {"cursor": page.next_cursor})
    return render(
        request,
        "tasks.html",
        400 if problem else 200,
        live=live,
        tasks=page.tasks if page else [],
        filters=filters,
        problem=problem,
        older=older,
        first_page="/tasks?" + urlencode(kept) if query.get("cursor") else None,
        statuses=[s.value for s in TaskStatus],
    )


async def task_page(request: Request) -> Response:
    task_id = request.path_params["task_id"]
    ledger = _ledger(request)
    live = await _live(request, task_id)
    task = await ledger.task(task_id)
    if task is None:
        return _refused(request, "No task with that id is recorded here.", 404)
    deliveries = await ledger.events(task_id) or []
    previews = [_preview(request, asset) for asset in task.assets]
    origins = {_origin(p["link"]) for p in previews if p["link"]}
    return render(
        request,
        "task.html",
        media=origins,
        live=live,
        task=task,
        previews=previews,
        deliveries=[_delivery(event) for event in deliveries],
        queued=request.query_params.get("queued"),
        retryable=_retryable(task),
    )


def _retryable(task: TaskRecord) -> dict[str, bool]:
    states = {asset.state for asset in task.assets}
    return {"failed": AssetState.failed in states, "stored": AssetState.stored in states}


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _preview(request: Request, asset: AssetRecord) -> dict[str, Any]:
    link = None
    if asset.state is AssetState.stored and asset.location:
        link = signed_link(request, asset.location, PREVIEW_SECONDS)
    tag = {AssetKind.video: "video", AssetKind.image: "img", AssetKind.audio: "audio"}[asset.kind]
    return {"asset": asset, "link": link, "tag": tag}


def _delivery(event: Any) -> dict[str, Any]:
    """A recorded delivery for the timeline, its body pretty-printed when it is JSON."""
    text = event.body.decode("utf-8", "replace")
    try:
        text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        pass
    return {"event": event, "body": text}


async def retry(request: Request) -> Response:
    task_id = request.path_params["task_id"]
    force = _form(request).get("force") == "true"
    queued = await requeue(request, task_id, force=force)
    if queued is None:
        return _refused(request, "No task with that id is recorded here.", 404)
    return _redirect(f"/tasks/{_quoted(task_id)}", queued=str(queued))


def _quoted(task_id: str) -> str:
    return quote(task_id, safe="")


# -- failures ---------------------------------------------------------------------------


async def failures(request: Request) -> Response:
    query = request.query_params
    state_text = query.get("state") or ""
    states = {state.value: state for state in PROBLEM_STATES}
    if state_text and state_text not in states:
        return _refused(request, "Unknown state.", 400)
    live = await _live(request)
    try:
        page = await _ledger(request).asset_problems(
            state=states.get(state_text), cursor=query.get("cursor") or None, limit=PAGE
        )
    except ValueError:
        return _refused(request, "That page link is not valid.", 400)
    older = None
    if page.next_cursor:
        shown = {"state": state_text} if state_text else {}
        older = "/failures?" + urlencode(shown | {"cursor": page.next_cursor})
    return render(
        request,
        "failures.html",
        live=live,
        problems=page.problems,
        state=state_text,
        states=list(states),
        older=older,
        queued=query.get("queued"),
    )


async def bulk_retry(request: Request) -> Response:
    """Queue again the failed files of every task ticked."""
    task_ids = [value for value in _form(request).getlist("task_id") if isinstance(value, str)]
    queued = 0
    for task_id in dict.fromkeys(task_ids):
        queued += await requeue(request, task_id, force=False) or 0
    return _redirect("/failures", queued=str(queued))


# -- outbound events -------------------------------------------------------------------


async def event_list(request: Request) -> Response:
    query = request.query_params
    event_type = query.get("type") or ""
    task_id = (query.get("task_id") or "").strip()
    cursor = query.get("cursor") or ""
    if event_type and event_type not in EVENT_TYPES:
        return _refused(request, "Unknown event type.", 400)
    if cursor and not (cursor.isascii() and cursor.isdigit() and len(cursor) <= 18):
        return _refused(request, "That page link is not valid.", 400)
    live = await _live(request)
    found = await _ledger(request).outbound_events(
        before=int(cursor) if cursor else None,
        type=event_type or None,
        task_id=task_id or None,
        limit=PAGE,
    )
    older = None
    if len(found) == PAGE:
        shown = {k: v for k, v in (("type", event_type), ("task_id", task_id)) if v}
        older = "/events?" + urlencode(shown | {"cursor": str(found[-1].id)})
    settings = request.app.state.settings
    return render(
        request,
        "events.html",
        live=live,
        events=[outbound_json(e) for e in found],
        types=EVENT_TYPES,
        type=event_type,
        task_id=task_id,
        older=older,
        # Chosen by position: an endpoint's URL may hold a secret, and only its redacted
        # form is ever put in a page.
        endpoints=[(str(n), redact_url(url)) for n, url in enumerate(settings.event_endpoints)],
        queued=query.get("queued"),
        problem=query.get("problem"),
    )


async def event_page(request: Request) -> Response:
    msg_id = request.path_params["msg_id"]
    found = await _ledger(request).delivery_log(msg_id)
    if found is None:
        return _refused(request, "No event with that id is in the outbox.", 404)
    event = outbound_json(found.event)
    payload = json.dumps(event["payload"], indent=2, ensure_ascii=False)
    return render(request, "event.html", event=event, payload=payload, deliveries=found.deliveries)


async def replay(request: Request) -> Response:
    form = _form(request)
    types = [t for t in form.getlist("type") if t]
    endpoints = request.app.state.settings.event_endpoints
    chosen = form.get("endpoint") or ""
    if chosen and not (
        isinstance(chosen, str) and chosen.isdigit() and int(chosen) < len(endpoints)
    ):
        return _redirect("/events", problem="Choose an endpoint from the list.")
    endpoint = endpoints[int(chosen)] if chosen else None
    try:
        asked = replay_request(
            form.get("since"),
            types,
            endpoint,
            endpoints,
            time.time(),
        )
    except BadReplay as exc:
        return _redirect("/events", problem=str(exc))
    queued = await _ledger(request).replay(asked.since, asked.types, asked.endpoint)
    return _redirect("/events", queued=str(queued))
