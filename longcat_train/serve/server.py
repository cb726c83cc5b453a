"""Start `longcat serve`: check the address, load nothing heavy until the first render, run uvicorn."""

from __future__ import annotations

import torch
import uvicorn
from rich.console import Console
from rich.markup import escape

from longcat_train.config import LoadedConfig

from .access import bind_token, loopback_hosts
from .app import create_app
from .service import PreviewService


def serve_run(loaded: LoadedConfig, host: str = "127.0.0.1", port: int = 7860, device: str | torch.device | None = None,
              allow_remote: bool = False, token: str | None = None, gpu_memory_gib: float | None = None,
              console: Console | None = None) -> None:
    """Serve the page until interrupted. Raises `AccessRefused` for a non-loopback `host` without
    `allow_remote` (then a token is required: `token`, or a new one printed with the link)."""
    console = console or Console()
    token = bind_token(host, allow_remote, token)
    service = PreviewService(loaded, device, gpu_memory_gib)
    app = create_app(service, token, None if allow_remote else loopback_hosts(port))
    shown = f"[{host}]" if ":" in host else host
    link = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    console.print(f"serving previews of {escape(str(service.folders.output_dir))} on {service.renderer.device}: "
                  f"{escape(link)}  (Ctrl+C stops)", soft_wrap=True)
    try:
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning")).run()
    finally:
        service.close()
