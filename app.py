"""lorastack: settings -> registry -> engine -> web UI -> launch. Nothing happens at import.

The UI is a thin client of `pipelines.engine.Engine`: it only builds GenerationRequests.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipelines.engine import Engine
    from pipelines.settings import Settings

log = logging.getLogger("lorastack")


def _quiet_environment() -> None:
    """The app phones nowhere by default (contract)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags and environment, build the engine, load the model, serve."""
    _quiet_environment()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from webui.zerogpu import prepare as prepare_zerogpu

    prepare_zerogpu()  # ZeroGPU: `spaces` must be imported before anything starts CUDA
    from pipelines.engine import build_engine
    from pipelines.hub import resolve_startup_checkpoint
    from pipelines.settings import parse_settings

    settings = parse_settings(sys.argv[1:] if argv is None else argv)
    for folder in (*settings.models_dirs, *settings.loras_dirs, settings.outputs_dir):
        Path(folder).mkdir(parents=True, exist_ok=True)
    engine = build_engine(settings) if settings.ray is None else _remote_engine(settings)
    startup = resolve_startup_checkpoint(settings.ckpt, engine.checkpoints, settings.models_dirs[0])
    engine.default_checkpoint = startup
    has_checkpoint = startup or any(not e.error for e in engine.checkpoints.entries())
    if has_checkpoint and settings.ray is None:
        # A real checkpoint loads in the background while the page already serves;
        # requests meanwhile wait for it or get "model still loading" (503).
        threading.Thread(
            target=_load_logged, args=(engine, startup), name="preload", daemon=True
        ).start()
    else:
        engine.load_checkpoint(startup)  # the demo model builds in about a second
    from pipelines.watch import FolderWatcher

    FolderWatcher([*settings.models_dirs, *settings.loras_dirs], engine.rescan).start()
    serve(engine, settings)


def _load_logged(engine: Engine, name: str | None) -> None:
    """Background start-up load: a failure is logged and the app keeps serving."""
    try:
        engine.load_checkpoint(name)
        log.info("model: %s", engine.current_title())
    except Exception:  # the page shows the error on the next request
        log.exception("could not load the start-up checkpoint %s", name)


def _remote_engine(settings: Settings) -> Engine:
    """--ray: generation runs on Ray Serve replicas; only this path imports Ray."""
    from pipelines.scaleout import ScaleOptions, connect

    assert settings.ray is not None
    options = ScaleOptions(
        replicas=settings.replicas,
        min_replicas=settings.min_replicas,
        max_replicas=settings.max_replicas,
    )
    return connect(settings, settings.ray, options)  # type: ignore[return-value]


def serve(engine: Engine, settings: Settings) -> None:
    """One server: the Gradio page at "/" and, with --api, the A1111 API at /sdapi/v1;
    --nowebui serves the API alone. --share needs Gradio's own launcher, so there the API
    is mounted into the app Gradio launched."""
    import uvicorn

    from pipelines.limits import UserLimits
    from webui.api import build_api, build_root, mount_api, parse_credentials

    auth = parse_credentials(settings.gradio_auth) if settings.gradio_auth else None
    limits = UserLimits(settings.rate_limit, settings.queue_slots)  # page and API share them
    if settings.nowebui:
        uvicorn.run(build_root(engine, settings, limits), host=settings.host, port=settings.port)
        return
    import gradio as gr

    from webui.ui import build_ui

    page = build_ui(engine, limits=limits)
    page.queue(default_concurrency_limit=1)
    allowed = [str(settings.outputs_dir)]
    if settings.share:
        page.launch(
            server_name=settings.host,
            server_port=settings.port,
            share=True,
            auth=auth,
            allowed_paths=allowed,
            prevent_thread_lock=True,
        )
        if settings.api:
            mount_api(page.app, build_api(engine, settings, limits))
        page.block_thread()
        return
    root = build_root(engine, settings, limits)
    gr.mount_gradio_app(root, page, path="/", auth=auth, allowed_paths=allowed)
    uvicorn.run(root, host=settings.host, port=settings.port)


if __name__ == "__main__":
    main()
