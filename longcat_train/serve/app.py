"""The HTTP routes of `longcat serve` (Starlette): the page, its JSON API and the run's files."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .access import AccessGuard
from .folders import PathRefused
from .service import PreviewService, RenderRefused, RenderRequest
from .uploads import MAX_IMAGE_BYTES, MAX_LORA_BYTES, UploadRefused, read_limited, spool_limited, store_image, store_lora

STATIC = Path(__file__).parent / "static"
SERVED_SUFFIXES = {".mp4": "video/mp4", ".png": "image/png"}


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status)


def create_app(service: PreviewService, token: str | None = None, allowed_hosts: list[str] | None = None) -> Starlette:
    """The app over `service`; `token` (when set) is required of every request, `allowed_hosts`
    (when set) are the Host headers answered."""

    async def index(_: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def status(_: Request) -> Response:
        return JSONResponse({**service.status(), "defaults": service.defaults()})

    async def run(_: Request) -> Response:
        return JSONResponse(await run_in_threadpool(service.run_overview))

    async def upload_image(request: Request) -> Response:
        try:
            data = await read_limited(request.stream(), MAX_IMAGE_BYTES, "the image upload")
            path = await run_in_threadpool(store_image, data, service.folders.uploads)
        except UploadRefused as error:
            return _error(str(error), 400)
        return JSONResponse({"path": service.folders.relative(path)})

    async def upload_lora(request: Request) -> Response:
        spooled = service.folders.uploads / f".upload-{os.getpid()}-{id(request)}.part"
        try:
            await spool_limited(request.stream(), MAX_LORA_BYTES, spooled, "the LoRA upload")
            path = await run_in_threadpool(store_lora, spooled, service.folders.uploads)
        except UploadRefused as error:
            return _error(str(error), 400)
        return JSONResponse({"path": service.folders.relative(path)})

    async def submit(request: Request) -> Response:
        try:
            render = RenderRequest.model_validate_json(await read_limited(request.stream(), 2**20, "the request"))
            job = await run_in_threadpool(service.submit, render)
        except (ValidationError, UploadRefused) as error:
            return _error(str(error), 400)
        except RenderRefused as error:
            return _error(str(error), 409)
        return JSONResponse(job.as_json())

    async def free(_: Request) -> Response:
        await run_in_threadpool(service.free)
        return JSONResponse({"model_loaded": service.renderer.model_loaded})

    async def run_file(request: Request) -> Response:
        relative = request.path_params["path"]
        media_type = SERVED_SUFFIXES.get(Path(relative).suffix.lower())
        try:
            if media_type is None:
                raise PathRefused(f"{relative!r}: only .mp4 and .png files of the run are served")
            path = service.folders.inside(relative)
        except PathRefused as error:
            return _error(str(error), 404)
        download = {"filename": path.name} if request.query_params.get("download") else {}
        return FileResponse(path, media_type=media_type, headers={"Cache-Control": "no-cache"}, **download)

    routes = [
        Route("/", index),
        Route("/api/status", status),
        Route("/api/run", run),
        Route("/api/uploads/image", upload_image, methods=["POST"]),
        Route("/api/uploads/lora", upload_lora, methods=["POST"]),
        Route("/api/renders", submit, methods=["POST"]),
        Route("/api/free", free, methods=["POST"]),
        Route("/files/{path:path}", run_file),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, middleware=[Middleware(AccessGuard, token=token, allowed_hosts=allowed_hosts)])
