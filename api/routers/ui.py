"""/ui: the jobs web page, plain HTML, JavaScript and CSS from api/ui/ (no build step, nothing
loaded from elsewhere). The page needs no route of its own: it signs in with an API key, which it
keeps in the tab's sessionStorage, and reads and writes only through the public REST API, so it
shows what the key's tenant may read and nothing else. Not part of the OpenAPI schema.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from api.errors import APIError

router = APIRouter(include_in_schema=False)

UI_DIR = Path(__file__).resolve().parents[1] / "ui"
FILES = {  # everything the page is made of; nothing else under api/ui/ is served
    "": ("index.html", "text/html; charset=utf-8"),
    "app.js": ("app.js", "text/javascript; charset=utf-8"),
    "style.css": ("style.css", "text/css; charset=utf-8"),
    "vendor/js-yaml.min.js": ("vendor/js-yaml.min.js", "text/javascript; charset=utf-8"),
}
# The page runs only its own files and talks only to this origin; no inline script or style, no framing.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate (ETag): a new version of the page shows at once
}


@router.get("/ui")
async def ui_root() -> RedirectResponse:
    return RedirectResponse("ui/", status_code=307)  # relative (a proxy may mount the API under a prefix); the page's files are relative to /ui/


@router.get("/ui/{path:path}")
async def ui_file(path: str) -> FileResponse:
    if path not in FILES:
        raise APIError(404, "not_found", f"No page file {path!r} under /ui/.", None)
    name, media_type = FILES[path]
    return FileResponse(UI_DIR / name, media_type=media_type, headers=HEADERS)
