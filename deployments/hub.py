"""The start-up checkpoint: a listed name, the operator's path, or a Hub repo to fetch.

Downloads use huggingface_hub (progress bars; HF_ENDPOINT, HF_HUB_OFFLINE, HF_TOKEN and the
HF_HUB_*_TIMEOUT variables apply) into the first models folder, as `org--repo` (a diffusers
folder, or a folder holding the repo's single-file checkpoint), so the result is listed like
any other model and a later start with the same `--ckpt org/repo` needs no network. Files
arrive in a hidden `.org--repo.partial` folder, which the registry never lists, and are
renamed into place only once complete; an interrupted download resumes from the files that
were finished.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from pipelines.errors import NotFoundError
from pipelines.folders.checkpoints import CheckpointEntry
from pipelines.folders.registry import ModelFolders

log = logging.getLogger(__name__)

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a diffusers txt2img pipeline needs, safetensors only (single or sharded). fnmatch
# patterns: `*` also spans `/`. Variants (`.fp16.`) and pickles (`.bin`) are left out.
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
DIFFUSERS_PATTERNS = [
    "model_index.json",
    "scheduler/*.json",
    "tokenizer*/*",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.safetensors.index.json",
    "unet/diffusion_pytorch_model-*-of-*.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors.index.json",
    "vae/diffusion_pytorch_model-*-of-*.safetensors",
    "text_encoder*/config.json",
    "text_encoder*/model.safetensors",
    "text_encoder*/model.safetensors.index.json",
    "text_encoder*/model-*-of-*.safetensors",
]


def local_name(repo_id: str) -> str:
    """The models-folder name of a downloaded repo: `org/repo` -> `org--repo`."""
    return repo_id.replace("/", "--")


def _wanted_files(repo_id: str, files: list[str]) -> list[str]:
    """The files to fetch from a repo listing; raises NotFoundError when nothing is usable."""
    from huggingface_hub.utils import filter_repo_objects

    if "model_index.json" in files:
        wanted = list(filter_repo_objects(files, allow_patterns=DIFFUSERS_PATTERNS))
        folders = {f.split("/")[0] for f in files if "/" in f}
        for component in (c for c in WEIGHT_COMPONENTS if c in folders):
            weights = (f for f in wanted if f.endswith(".safetensors"))
            if not any(f.startswith(f"{component}/") for f in weights):
                raise NotFoundError(
                    f"Hub repo {repo_id} has no safetensors weights for {component} (only "
                    "pickles or fp16 variants?); lorastack downloads .safetensors only",
                    field="ckpt",
                )
        return wanted
    singles = sorted(f for f in files if f.endswith(".safetensors") and "/" not in f)
    if not singles:
        raise NotFoundError(
            f"Hub repo {repo_id} holds neither a diffusers model (model_index.json) nor a "
            "top-level .safetensors checkpoint",
            field="ckpt",
        )
    if len(singles) > 1:
        log.info("%s holds %d checkpoints; taking %s", repo_id, len(singles), singles[0])
    sidecar = singles[0].removesuffix(".safetensors") + ".yaml"
    return [singles[0], *([sidecar] if sidecar in files else [])]


def download_from_hub(repo_id: str, models_dir: Path) -> Path:
    """Fetch a diffusers repo (safetensors weights only) or a repo's top-level .safetensors
    checkpoint (with its same-named .yaml, if any) into `models_dir / "org--repo"`.

    Args:
        repo_id: `org/repo` on the Hub (or the mirror HF_ENDPOINT names).
        models_dir: the models folder to download into.
    Returns:
        The diffusers folder, or the single checkpoint file inside the repo's folder.
    Raises:
        NotFoundError naming the repo and the reason: offline, unreachable, unknown repo,
        nothing usable in it, or the download failed (its finished files are kept for the
        next try, out of the listing).
    Example:
        >>> download_from_hub("org/tiny", Path("models"))
        PosixPath('models/org--tiny')
    """
    from huggingface_hub import HfApi, constants, snapshot_download

    target = models_dir / local_name(repo_id)
    partial = models_dir / f".{target.name}.partial"
    if target.exists():
        raise NotFoundError(
            f"--ckpt {repo_id}: {target} exists but holds no listed checkpoint; move it "
            "away to download the repo again",
            field="ckpt",
        )
    try:
        # One request without retries: fails fast when offline or the Hub is unreachable.
        info = HfApi().model_info(repo_id, timeout=constants.HF_HUB_ETAG_TIMEOUT)
        files = _wanted_files(repo_id, [s.rfilename for s in info.siblings or []])
        log.info("downloading %s (%d files) into %s", repo_id, len(files), target)
        # Pinned to the listed commit, so every file comes from the same revision.
        snapshot_download(repo_id, revision=info.sha, local_dir=partial, allow_patterns=files)
    except NotFoundError:
        raise
    except Exception as error:  # huggingface_hub and its HTTP client raise many types
        reason = " ".join(f"{type(error).__name__}: {error}".split())[:400]
        raise NotFoundError(
            f"--ckpt {repo_id}: not found locally, and the Hub at {constants.ENDPOINT} "
            f"could not provide it ({reason})",
            field="ckpt",
        ) from error
    shutil.rmtree(partial / ".cache", ignore_errors=True)  # download bookkeeping
    partial.rename(target)
    return target if "model_index.json" in files else target / files[0]


def downloaded_entry(folders: ModelFolders, repo_id: str) -> CheckpointEntry | None:
    """The listed checkpoint an earlier download of `repo_id` left, if any."""
    name = local_name(repo_id)
    found = [
        e
        for e in folders.entries("checkpoint")
        if e.relpath == name or e.relpath.startswith(name + "/")
    ]
    usable = [e for e in found if not e.error]
    return next(iter(usable or found), None)


def resolve_startup_checkpoint(
    wanted: str | None, folders: ModelFolders, models_dir: Path
) -> str | None:
    """`--ckpt`: a listed name, else an existing path, else a Hub repo id (downloaded once,
    then found as `org--repo`). Returns the registry relpath to load, or None for the
    default choice. Raises NotFoundError naming `wanted` when none of these applies."""
    if not wanted:
        return None
    try:
        entry: CheckpointEntry = folders.resolve("checkpoint", wanted)
        return entry.relpath
    except NotFoundError:
        pass
    path = Path(wanted).expanduser()
    if path.exists():
        operator: CheckpointEntry = folders.add_operator_path("checkpoint", path)
        return operator.relpath
    if REPO_ID.fullmatch(wanted):
        earlier = downloaded_entry(folders, wanted)
        if earlier is not None:
            return earlier.relpath
        downloaded = download_from_hub(wanted, models_dir)
        folders.scan("checkpoint")
        found: CheckpointEntry = folders.resolve(
            "checkpoint", downloaded.relative_to(models_dir).as_posix()
        )
        return found.relpath
    raise NotFoundError(
        f"--ckpt {wanted}: no listed checkpoint, file or Hub repo id of that name",
        field="ckpt",
    )
