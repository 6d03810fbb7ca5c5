"""The web console under /console/: static files shipped in the package, served with a strict
Content-Security-Policy. The console holds no data and has no API of its own: its script
calls the documented gateway API with the bearer token pasted into the tab, so each of its
queries is authenticated, scoped and audited like any other client's.

The files are read once (importlib.resources, so an installed wheel serves its own copies)
and served from memory; only the names listed here exist.
"""

from __future__ import annotations

import functools
import importlib.resources

from aiohttp import web

FILES = {
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}

# No inline script or style, nothing from another origin, no string-to-HTML sinks (Trusted
# Types with no policy: assigning a string to innerHTML throws), never framed.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'; require-trusted-types-for 'script'; trusted-types 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


@functools.cache
def _file(name: str) -> bytes:
    return importlib.resources.files(__name__).joinpath("static", name).read_bytes()


async def console_file(request: web.Request) -> web.Response:
    """One of the console's files; anything else under /console/ is 404 not_found."""
    name = request.match_info.get("name") or "index.html"
    content_type = FILES.get(name)
    if content_type is None:
        raise web.HTTPNotFound()
    return web.Response(body=_file(name), headers={"Content-Type": content_type, **HEADERS})


async def to_console(request: web.Request) -> web.Response:
    return web.Response(status=308, headers={"Location": "/console/"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/console", to_console)
    app.router.add_get("/console/", console_file)
    app.router.add_get("/console/{name}", console_file)
