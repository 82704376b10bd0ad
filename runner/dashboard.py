"""The dashboard: its page and files, and the login that trades an API token for a session cookie.

The page (``runner/static/dashboard``) is static and holds no data: it calls the same JSON API
as everyone else, so it needs no token to load. ``POST /login`` checks a token as the Guard
checks a bearer token (``runner.auth.Tokens``) and answers with an opaque session id in an
HttpOnly, SameSite=Strict cookie; the Guard then takes the cookie where it takes a token, and
asks a change made with it for the ``X-Workerhost-CSRF: 1`` header (runner/auth.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.staticfiles import StaticFiles

from runner.auth import CALLER, REFUSED, SESSION_COOKIE, Caller, Sessions, Tokens, caller

STATIC = Path(__file__).parent / "static" / "dashboard"
# The page loads only its own files and calls only this host; no other site may frame it.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter()
_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}  # runner.api's ErrorOut


def mount(app: FastAPI, tokens: Tokens, sessions: Sessions) -> None:
    """The dashboard's routes and files on ``app``; ``sessions`` is the Guard's too."""
    app.state.tokens, app.state.sessions = tokens, sessions
    # check_dir=False: a package built without the page still serves the API (its files answer 404).
    app.mount("/static/dashboard", StaticFiles(directory=STATIC, check_dir=False), name="dashboard")
    app.include_router(router)


class LoginIn(BaseModel):
    """A token of ``[host] api_token`` / ``api_tokens``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    token: str = Field(min_length=1, max_length=4096)


class SessionOut(BaseModel):
    auth_required: bool = Field(description="whether the API asks for a token ([host] api_token)")
    logged_in: bool = Field(description="whether this request may use the API (a token, a session, or none needed)")


@router.get("/", include_in_schema=False)
async def page() -> Response:
    index = STATIC / "index.html"
    if not index.is_file():
        return JSONResponse({"error": "the dashboard's files are not installed"}, status_code=404)
    return FileResponse(index, media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)


@router.get("/session", summary="Whether the API asks for a token, and whether this caller has one",
            operation_id="get_session", response_model=SessionOut)  # fmt: skip
async def session(request: Request) -> dict[str, Any]:
    who = caller(request)
    required = who is not None and who.required
    return {"auth_required": required, "logged_in": who is not None and (who.token is not None or not required)}


@router.post(
    "/login", status_code=204, summary="Trade a token for a session cookie (the dashboard's login)",
    operation_id="login", response_class=Response,
    responses={
        400: {"description": "the body is not valid JSON", "content": _ERROR},
        401: {"description": "not one of the API's tokens", "content": _ERROR},
        413: {"description": "the body is over [host] max_body", "content": _ERROR},
    },
)  # fmt: skip
async def login(body: LoginIn, request: Request) -> Response:
    tokens: Tokens = request.app.state.tokens
    if not tokens:
        return Response(status_code=204)  # nothing to log in to
    name = tokens.identify(body.token)
    if name is None:
        request.scope.setdefault("state", {})[REFUSED] = "invalid"  # counted and audited by the Guard
        return JSONResponse({"error": "the token is not valid"}, status_code=401)
    request.scope.setdefault("state", {})[CALLER] = Caller(name, required=True)  # the audit names the token
    sessions: Sessions = request.app.state.sessions
    response = Response(status_code=204)
    response.set_cookie(
        SESSION_COOKIE, sessions.open(name), max_age=int(sessions.ttl), path="/", httponly=True, samesite="strict",
        secure=request.url.scheme == "https",
    )  # fmt: skip
    return response


@router.post("/logout", status_code=204, summary="End the session", operation_id="logout",
             response_class=Response)  # fmt: skip
async def logout(request: Request) -> Response:
    sessions: Sessions = request.app.state.sessions
    sessions.close(request.cookies.get(SESSION_COOKIE))
    response = Response(status_code=204)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response
