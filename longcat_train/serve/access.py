"""Who may talk to the server: loopback by default; another address only with `--allow-remote` and
a token. Every request then carries the token (a cookie the page gets from `/?token=...`, or an
`Authorization: Bearer` header). Requests that change something must come from the page itself
(an `Origin` other than the server's is refused), so another site open in the browser cannot
drive the local server."""

from __future__ import annotations

import ipaddress
import secrets

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse
from starlette.types import ASGIApp, Receive, Scope, Send

TOKEN_COOKIE = "longcat_serve_token"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


class AccessRefused(ValueError):
    pass


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_token(host: str, allow_remote: bool, token: str | None) -> str | None:
    """The token the server requires: None on loopback without one; a given or new one otherwise.
    Another address without `allow_remote` is refused."""
    if is_loopback(host):
        return token
    if not allow_remote:
        raise AccessRefused(f"--host {host} is not a loopback address: the page renders on your GPU and reads "
                            "your run. Pass --allow-remote (and --token, or use the one printed) to serve it "
                            "on other addresses")
    return token or secrets.token_urlsafe(24)


def loopback_hosts(port: int) -> list[str]:
    """The Host headers a loopback server answers (others, as a DNS-rebinding page sends, are refused)."""
    names = ["127.0.0.1", "localhost", "[::1]"]
    return [*names, *(f"{name}:{port}" for name in names)]


class AccessGuard:
    """ASGI middleware: Host allow-list (loopback), same-origin writes, token."""

    def __init__(self, app: ASGIApp, token: str | None, allowed_hosts: list[str] | None) -> None:
        self.app, self.token, self.allowed_hosts = app, token, allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        host = request.headers.get("host", "")
        if self.allowed_hosts is not None and host not in self.allowed_hosts:
            await JSONResponse({"error": f"host {host!r} is not served here"}, 400)(scope, receive, send)
            return
        origin = request.headers.get("origin")
        if request.method not in SAFE_METHODS and origin is not None and origin.split("://", 1)[-1] != host:
            await JSONResponse({"error": f"requests from {origin} are refused"}, 403)(scope, receive, send)
            return
        if self.token is not None:
            given = request.query_params.get("token")
            if given is not None and request.url.path == "/" and secrets.compare_digest(given, self.token):
                # the link with the token sets the cookie, then drops the token from the address bar
                response = RedirectResponse("/", 303)
                response.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="strict")
                await response(scope, receive, send)
                return
            if not self._has_token(request):
                await JSONResponse({"error": "a token is required: open the link `longcat serve` printed"}, 401)(
                    scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _has_token(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        offered = header.removeprefix("Bearer ") if header.startswith("Bearer ") else request.cookies.get(TOKEN_COOKIE)
        return offered is not None and secrets.compare_digest(offered.encode(), self.token.encode())
