"""Start `longcat serve`: check the address, load nothing heavy until the first render, run uvicorn."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import uvicorn
from rich.console import Console
from rich.markup import escape

from longcat_train.config import LoadedConfig

from .access import bind_token, loopback_hosts
from .app import create_app
from .service import PreviewService


@dataclass
class PreviewServer:
    server: uvicorn.Server
    service: PreviewService
    link: str  # what to open (with the token when one is required)

    def run(self) -> None:
        """Serve until interrupted (or `server.should_exit`), then stop the render worker."""
        try:
            self.server.run()
        finally:
            self.service.close()


def build_server(loaded: LoadedConfig, host: str = "127.0.0.1", port: int = 7860,
                 device: str | torch.device | None = None, allow_remote: bool = False, token: str | None = None,
                 gpu_memory_gib: float | None = None) -> PreviewServer:
    """The server of `longcat serve`. Raises `AccessRefused` for a non-loopback `host` without
    `allow_remote` (then a token is required: `token`, or a new one in the link)."""
    token = bind_token(host, allow_remote, token)
    service = PreviewService(loaded, device, gpu_memory_gib)
    app = create_app(service, token, None if allow_remote else loopback_hosts(port))
    shown = f"[{host}]" if ":" in host else host
    link = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    return PreviewServer(uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning")), service, link)


def serve_run(loaded: LoadedConfig, host: str = "127.0.0.1", port: int = 7860, device: str | torch.device | None = None,
              allow_remote: bool = False, token: str | None = None, gpu_memory_gib: float | None = None,
              console: Console | None = None) -> None:
    """`build_server`, print the link, serve until interrupted."""
    preview = build_server(loaded, host, port, device, allow_remote, token, gpu_memory_gib)
    (console or Console()).print(f"serving previews of {escape(str(preview.service.folders.output_dir))} on "
                                 f"{preview.service.renderer.device}: {escape(preview.link)}  (Ctrl+C stops)",
                                 soft_wrap=True)
    preview.run()
