"""The playground: `GET /` serves `serve/static/index.html`, `/static/...` its files."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

from microtransformer.serve.protocol import APIError

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


async def playground() -> Response:
    page = STATIC_DIR / "index.html"
    if not page.is_file():
        raise APIError(404, "the playground page is not installed (no "
                       "serve/static/index.html)", type="not_found_error")
    return FileResponse(page)


def add_playground(app: FastAPI) -> None:
    """The page at / (not in the OpenAPI schema) and its static files under /static."""
    app.get("/", include_in_schema=False)(playground)
    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
