"""lorastack: settings -> registry -> engine -> web UI -> launch. Nothing happens at import.

The UI is a thin client of `pipelines.engine.Engine`: it only builds GenerationRequests.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("lorastack")


def _quiet_environment() -> None:
    """The app phones nowhere by default (contract)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags and environment, build the engine, load the model, serve."""
    _quiet_environment()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from pipelines.engine import build_engine
    from pipelines.hub import resolve_startup_checkpoint
    from pipelines.settings import parse_settings

    settings = parse_settings(sys.argv[1:] if argv is None else argv)
    for folder in (*settings.models_dirs, *settings.loras_dirs, settings.outputs_dir):
        Path(folder).mkdir(parents=True, exist_ok=True)
    engine = build_engine(settings)
    startup = resolve_startup_checkpoint(settings.ckpt, engine.checkpoints, settings.models_dirs[0])
    engine.load_checkpoint(startup)
    from pipelines.watch import FolderWatcher

    FolderWatcher([*settings.models_dirs, *settings.loras_dirs], engine.rescan).start()
    log.info("model: %s", engine.current_title())
    from webui.ui import build_ui

    page = build_ui(engine)
    page.queue(default_concurrency_limit=1)
    page.launch(
        server_name=settings.host,
        server_port=settings.port,
        share=settings.share,
        allowed_paths=[str(settings.outputs_dir)],
    )


if __name__ == "__main__":
    main()
