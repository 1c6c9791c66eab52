"""lorastack: flags -> settings -> service -> front ends -> launch. Nothing happens at import.

The page and the A1111 API are thin clients of one `GenerationService`; which service that
is (this process's engine, Ray replicas, ZeroGPU) is decided here and nowhere else.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deployments.firstrun import BackgroundDownload
    from pipelines.service import Service
    from pipelines.settings import Settings

log = logging.getLogger("lorastack")


def _quiet_environment() -> None:
    """The app phones nowhere by default (contract)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags and environment, build the service, start loading the model, serve."""
    _quiet_environment()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from deployments.zerogpu import prepare as prepare_zerogpu

    zero_gpu = prepare_zerogpu()  # ZeroGPU: `spaces` must be imported before CUDA starts
    from deployments.hub import REPO_ID, resolve_startup_checkpoint
    from pipelines.output import remove_stale_placeholders
    from pipelines.service import build_folders, build_service
    from pipelines.settings import apply_threads, parse_settings

    settings = parse_settings(sys.argv[1:] if argv is None else argv)
    apply_threads(settings)
    for folder in (
        *settings.models_dirs,
        *settings.loras_dirs,
        *settings.embeddings_dirs,  # watched from the start, so new files show up
        settings.outputs_dir,
    ):
        Path(folder).mkdir(parents=True, exist_ok=True)
    for leftover in remove_stale_placeholders(settings.outputs_dir):
        logging.getLogger("lorastack").info("removed %s, left by an interrupted save", leftover)
    folders = build_folders(settings)
    if settings.ckpt and REPO_ID.fullmatch(settings.ckpt):  # preloaded into the Hub cache?
        from deployments.firstrun import link_cached_repo

        if link_cached_repo(settings.ckpt, settings.models_dirs[0]) is not None:
            folders.scan("checkpoint")
    startup = resolve_startup_checkpoint(settings.ckpt, folders, settings.models_dirs[0])
    notice, download = None, None
    if startup is None:  # no --ckpt: fetch the default unless a checkpoint exists (A1111)
        from deployments.firstrun import first_run

        outcome = first_run(settings, folders, background=True)
        notice, download = outcome.reason, outcome.download
    if settings.ray is not None:
        from deployments.ray.scaleout import ray_runner

        service = build_service(settings, ray_runner, folders=folders)
    elif zero_gpu:
        from deployments.zerogpu import zero_gpu_runner

        service = build_service(settings, zero_gpu_runner, folders=folders)
    else:
        service = build_service(settings, folders=folders)
    service.startup_checkpoint = startup
    # The start-up model loads through the queue while the page already serves; requests
    # meanwhile get "model still loading" (503). Without a checkpoint the demo model
    # builds in about a second.
    service.preload(startup)
    if download is not None:  # the page serves the demo meanwhile and shows the progress

        def use_downloaded(placed: Path) -> None:
            service.rescan()
            service.preload(placed.name)  # loaded and selected in place of the demo

        download.start(use_downloaded)
    from pipelines.watch import FolderWatcher

    watched = [
        *settings.models_dirs,
        *settings.loras_dirs,
        *settings.upscaler_dirs,
        *settings.vae_dirs,
        *settings.embeddings_dirs,
        *settings.controlnet_dirs,
    ]
    FolderWatcher(watched, service.rescan).start()
    serve(service, settings, notice=notice, download=download)


def serve(
    service: Service,
    settings: Settings,
    *,
    notice: str | None = None,
    download: BackgroundDownload | None = None,
) -> None:
    """One server: the Gradio page at "/" and, with --api, the A1111 API at /sdapi/v1;
    --nowebui serves the API alone. --share needs Gradio's own launcher, so there the API
    is mounted into the app Gradio launched. `notice` says why the demo model runs;
    `download` is the first-run download under way (the page shows its progress)."""
    import uvicorn

    from frontends.api.routes import build_api, build_controlnet_api, build_root, mount_api
    from pipelines.settings import parse_credentials

    auth = parse_credentials(settings.gradio_auth) if settings.gradio_auth else None
    if settings.nowebui:
        uvicorn.run(
            build_root(service, settings),
            host=settings.host,
            port=settings.port,
            access_log=settings.access_log,
        )
        return
    import gradio as gr

    from frontends.page import gradio_guards
    from frontends.page.ui import build_ui

    gradio_guards.install()
    page = build_ui(service, settings, demo_reason=notice, first_download=download)
    page.queue(default_concurrency_limit=1)
    from starlette.middleware import Middleware

    from frontends.page.private_files import PrivateFolders

    allowed = [str(settings.outputs_dir), str(settings.cache_dir / "thumbnails")]
    # On a shared server images are per visitor: never served by their path.
    folders = [Path(folder) for folder in allowed]
    if settings.share:
        if not settings.access_log:  # Gradio's own uvicorn: quiet its access logger
            logging.getLogger("uvicorn.access").disabled = True
        page.launch(
            server_name=settings.host,
            server_port=settings.port,
            share=True,
            auth=auth,
            allowed_paths=allowed,
            prevent_thread_lock=True,
            app_kwargs={"middleware": [Middleware(PrivateFolders, folders=folders)]},
        )
        if settings.api:
            mount_api(
                page.app, build_api(service, settings), build_controlnet_api(service, settings)
            )
        page.block_thread()
        return
    root = build_root(service, settings)
    if settings.listen:  # (a Space sets it too)
        root.add_middleware(PrivateFolders, folders=folders)
    gr.mount_gradio_app(root, page, path="/", auth=auth, allowed_paths=allowed)
    uvicorn.run(root, host=settings.host, port=settings.port, access_log=settings.access_log)


if __name__ == "__main__":
    main()
