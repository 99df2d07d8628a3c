"""The playground: GET /playground serves one static page (HTML, JS modules, CSS) that calls the
API from the browser; GET / redirects to it.

The files are served from app/static/playground (shipped in the wheel as package data), with
no build step and nothing fetched from elsewhere. The page is public (the middleware lets GET
/ and /playground* through without the API key); the API calls it makes carry the key the
user types into the page. These routes are not API operations, so they stay out of OpenAPI.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from app.api.errors import APIError

STATIC_DIR = Path(__file__).resolve().parents[2] / "static" / "playground"
PLAYGROUND_PATH = "/playground"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
# Browsers revalidate (cheap: ETag / Last-Modified), so an upgraded server never runs stale JS.
CACHE_HEADERS = {"Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


def asset_files() -> dict[str, Path]:
    """The files the page may load, by name: a fixed listing, so no path from a URL ever
    reaches the file system."""
    return {
        path.name: path
        for path in sorted(STATIC_DIR.iterdir())
        if path.is_file() and path.suffix in MEDIA_TYPES
    }


ASSETS = asset_files()


def file_response(path: Path) -> FileResponse:
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=CACHE_HEADERS)


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse(PLAYGROUND_PATH, status_code=307)


@router.get(PLAYGROUND_PATH)
async def playground() -> FileResponse:
    return file_response(ASSETS["index.html"])


@router.get(PLAYGROUND_PATH + "/")
async def playground_slash() -> RedirectResponse:
    return RedirectResponse(PLAYGROUND_PATH, status_code=307)


@router.get(PLAYGROUND_PATH + "/{name}")
async def playground_asset(name: str) -> FileResponse:
    path = ASSETS.get(name)
    if path is None:
        raise APIError(404, f"no playground file named {name!r}", "not_found")
    return file_response(path)
