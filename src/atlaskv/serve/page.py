"""The web page: three static files (static/index.html, app.js, style.css), served without the key.

They hold no data: the page asks for the key (when the server has one) and sends it with every API call it
makes, so without the key it shows nothing but its login form. A strict Content-Security-Policy: the page
runs only its own script and talks only to this server.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC = Path(__file__).resolve().parent / "static"
FILES = {"/": ("index.html", "text/html; charset=utf-8"),
         "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
         "/static/style.css": ("style.css", "text/css; charset=utf-8")}
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                      "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"}

page_router = APIRouter()


def page_file(name: str, media_type: str):
    def serve() -> FileResponse:
        return FileResponse(STATIC / name, media_type=media_type, headers=HEADERS)

    return serve


for route, (name, media_type) in FILES.items():
    page_router.add_api_route(route, page_file(name, media_type), methods=["GET"], include_in_schema=False)
