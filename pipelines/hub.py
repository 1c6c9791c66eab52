"""The start-up checkpoint: a listed name, the operator's path, or a Hub repo to fetch.

Downloads use huggingface_hub (resumable, with progress bars, honouring HF_ENDPOINT and
HF_HUB_OFFLINE), into the first models folder so the result is listed like any other file.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from pipelines.errors import NotFoundError
from pipelines.registry import CheckpointRegistry

log = logging.getLogger(__name__)

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DIFFUSERS_PATTERNS = [
    "model_index.json",
    "scheduler/*.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder*/config.json",
    "text_encoder*/model.safetensors",
    "tokenizer*/*",
]


def download_from_hub(repo_id: str, models_dir: Path) -> Path:
    """Fetch a diffusers repo (safetensors weights only) or a repo's single .safetensors
    checkpoint into `models_dir`; returns the folder or file. Raises NotFoundError with the
    reason when the Hub cannot be reached or has nothing usable."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        files = HfApi().list_repo_files(repo_id)
        if "model_index.json" in files:
            target = models_dir / repo_id.replace("/", "--")
            log.info("downloading diffusers model %s into %s", repo_id, target)
            snapshot_download(repo_id, local_dir=target, allow_patterns=DIFFUSERS_PATTERNS)
            return target
        singles = sorted(f for f in files if f.endswith(".safetensors") and "/" not in f)
        if not singles:
            raise NotFoundError(
                f"Hub repo {repo_id} holds neither a diffusers model nor a top-level "
                ".safetensors checkpoint",
                field="ckpt",
            )
        log.info("downloading %s from %s", singles[0], repo_id)
        return Path(hf_hub_download(repo_id, singles[0], local_dir=models_dir))
    except (OfflineModeIsEnabled, LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
        raise NotFoundError(
            f"--ckpt {repo_id}: not found locally, and the Hub could not provide it ({error})",
            field="ckpt",
        ) from error


def resolve_startup_checkpoint(
    wanted: str | None, registry: CheckpointRegistry, models_dir: Path
) -> str | None:
    """`--ckpt`: a listed name, else an existing path, else a Hub repo id (downloaded).
    Returns the registry relpath to load, or None for the default choice."""
    if not wanted:
        return None
    try:
        return registry.resolve(wanted).relpath
    except NotFoundError:
        pass
    path = Path(wanted).expanduser()
    if path.exists():
        return registry.register_path(path).relpath
    if REPO_ID.fullmatch(wanted):
        downloaded = download_from_hub(wanted, models_dir)
        registry.scan()
        return registry.resolve(downloaded.relative_to(models_dir).as_posix()).relpath
    raise NotFoundError(
        f"--ckpt {wanted}: no listed checkpoint, file or Hub repo id of that name",
        field="ckpt",
    )
