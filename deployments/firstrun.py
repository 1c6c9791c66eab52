"""First run: with no checkpoint anywhere, fetch one default checkpoint, as A1111 and Fooocus do.

A1111 (`modules/sd_models.py`, `list_models`) downloads `v1-5-pruned-emaonly.safetensors`
into its models folder when no checkpoint is found, unless `--no-download-sd-model`; Fooocus
downloads its default model at start-up. Here the Hub is asked once (time-out
`CHECK_TIMEOUT`) and only when no checkpoint file is listed at all, the flag is off and
`HF_HUB_OFFLINE` is not set; that check is the only contact the app makes by default.

A checkpoint a Space preloaded at build time (`preload_from_hub` in the README's front
matter) sits in the Hub cache: it is found there without any network and linked into the
models folder. A download goes into a hidden `.NAME.partial` folder in the models folder
(never listed); huggingface_hub keeps the unfinished bytes there and resumes them with a
`Range` request on the next start. The finished file must have the size and sha256 the
Hub lists and be a Stable Diffusion checkpoint (ingest's header check) before it is moved
into place; a file that fails is deleted and named in the reason. Whatever goes wrong, the
demo model runs and `FirstRun.reason` says why and how to fix it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deployments.ingest import _inspect, _place, _progress_bar
from pipelines.errors import LorastackError, NotFoundError, UnusableFileError

if TYPE_CHECKING:
    from pipelines.folders.registry import ModelFolders
    from pipelines.settings import Settings

log = logging.getLogger(__name__)

CHECK_TIMEOUT = 3.0
"""Seconds the first-run Hub check (and each network wait of the download) may take."""
READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class Starter:
    """A pinned checkpoint the app offers: one file of one Hub repo."""

    repo_id: str
    filename: str
    label: str

    def __str__(self) -> str:
        return f"{self.repo_id}/{self.filename}"


STARTERS = (
    Starter(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "v1-5-pruned-emaonly.safetensors",
        "Stable Diffusion 1.5 (A1111's default)",
    ),
    Starter(
        "stabilityai/stable-diffusion-xl-base-1.0",
        "sd_xl_base_1.0.safetensors",
        "SDXL base 1.0",
    ),
    Starter(
        "ByteDance/SDXL-Lightning",
        "sdxl_lightning_4step.safetensors",
        "SDXL-Lightning, 4 steps (few-step: Euler, SGM Uniform, CFG 1)",
    ),
)
DEFAULT_STARTER = STARTERS[0]

ProgressCallback = Callable[[int, "int | None"], None]
"""Called with (bytes done, total bytes or None)."""


@dataclass(frozen=True)
class StarterInfo:
    """A starter as the Hub lists it now: size and licence are shown before a download."""

    starter: Starter
    revision: str
    size: int | None
    sha256: str | None
    licence: str | None
    files: tuple[str, ...]


@dataclass
class BackgroundDownload:
    """The first-run download of `starter`, run while the page already serves the demo
    model: its bytes so far for the page's banner and a console bar, then the file placed or
    why not. `start` runs it on a thread; `on_placed` (say: rescan and load it) follows a
    success."""

    starter: Starter
    models_dir: Path
    done: int = 0
    total: int | None = None
    placed: Path | None = None
    failure: str | None = None
    finished: threading.Event = field(default_factory=threading.Event)
    _console: Any = None

    def report(self, done: int, total: int | None) -> None:
        """huggingface_hub's progress, kept for the page and drawn on the console."""
        self.done, self.total = done, total
        if self._console is None:
            from tqdm import tqdm

            self._console = tqdm(
                total=total, initial=done, unit="B", unit_scale=True, desc=self.starter.filename
            )
        else:
            self._console.update(done - self._console.n)

    def run(self, on_placed: Callable[[Path], None] | None = None) -> None:
        """Download (blocking); never raises: a failure is kept in `failure`."""
        try:
            self.placed = download_starter(self.starter, self.models_dir, progress=self.report)
        except LorastackError as error:
            log.warning("first run: %s", error.message)
            self.failure = f"the default checkpoint could not be downloaded: {error.message}"
        finally:
            if self._console is not None:
                self._console.close()
        try:
            if self.placed is not None and on_placed is not None:
                on_placed(self.placed)
        finally:
            self.finished.set()

    def start(self, on_placed: Callable[[Path], None] | None = None) -> threading.Thread:
        thread = threading.Thread(
            target=self.run, args=(on_placed,), name="first-run-download", daemon=True
        )
        thread.start()
        return thread

    def line(self) -> str:
        """One Markdown line for the page: progress, the file placed, or why not."""
        name = self.starter.filename
        if self.placed is not None:
            return f"Downloaded **{name}**: it is the checkpoint now (the demo model is gone)."
        if self.failure is not None:
            return f"The download of **{name}** failed, so the demo model runs: {self.failure}."
        if not self.total:
            return f"Downloading **{name}** from the Hub ({_size(self.done)} so far)…"
        percent = 100 * self.done / self.total
        return (
            f"Downloading **{name}** from the Hub: {_size(self.done)} of {_size(self.total)} "
            f"({percent:.0f}%); the demo model runs meanwhile."
        )


def _size(count: int) -> str:
    return f"{count / 10**9:.2f} GB" if count >= 10**9 else f"{count / 10**6:.1f} MB"


@dataclass(frozen=True)
class FirstRun:
    """What start-up did about a missing checkpoint: the checkpoint now in place, or why the
    demo model runs (`reason`, a sentence for the log and the page's banner), or the
    download still to run in the background (`download`, not started)."""

    checkpoint: Path | None = None
    reason: str | None = None
    download: BackgroundDownload | None = None


def download_refusal(settings: Settings, env: Mapping[str, str] | None = None) -> str | None:
    """Why the first run must not contact the Hub (the flag or offline mode), else None."""
    if settings.no_download_sd_model:
        return (
            "no checkpoint was found and --no-download-sd-model is set; put a checkpoint into "
            "models/ and refresh, or start without that flag to download the default"
        )
    value = (os.environ if env is None else env).get("HF_HUB_OFFLINE", "")
    if value.strip().upper() in ("1", "ON", "YES", "TRUE"):
        return (
            "no checkpoint was found and HF_HUB_OFFLINE is set, so none was downloaded; put a "
            "checkpoint into models/ and refresh, or start online once"
        )
    return None


def _sidecar(filename: str) -> str:
    """A1111's same-named config beside a checkpoint: `name.safetensors` -> `name.yaml`."""
    return filename.removesuffix(".safetensors") + ".yaml"


def cached_starter(cache_dir: Path | None = None) -> tuple[Starter, list[Path]] | None:
    """A starter already in the Hub cache (a Space's `preload_from_hub`), with its sidecar
    yaml when that was preloaded too; reads only the disk."""
    from huggingface_hub import try_to_load_from_cache

    for starter in STARTERS:
        found = [
            Path(path)
            for name in (starter.filename, _sidecar(starter.filename))
            if isinstance(
                path := try_to_load_from_cache(starter.repo_id, name, cache_dir=cache_dir), str
            )
            and Path(path).is_file()
        ]
        if found and found[0].name == starter.filename:
            return starter, found
    return None


def link_cached(cached: list[Path], models_dir: Path) -> Path:
    """Link Hub-cache files into the models folder under their own names (listed like any
    checkpoint, no second copy); existing files of those names are left alone. Returns the
    checkpoint's link."""
    models_dir.mkdir(parents=True, exist_ok=True)
    for path in cached:
        target = models_dir / path.name
        if not os.path.lexists(target):
            target.symlink_to(path.resolve())
    return models_dir / cached[0].name


def link_cached_repo(repo_id: str, models_dir: Path, cache_dir: Path | None = None) -> Path | None:
    """`--ckpt org/repo` preloaded into the Hub cache (`preload_from_hub`): link its snapshot
    into the models folder as `org--repo`, where `deployments.hub` looks for an earlier
    download, so it is not downloaded again. Reads only the disk; None when not cached.

    A diffusers repo (its `model_index.json` cached) is linked as the folder; otherwise the
    snapshot's first top-level `.safetensors` (and its same-named `.yaml`) are linked into
    an `org--repo` folder, the file `deployments.hub` would have picked.
    """
    from huggingface_hub import try_to_load_from_cache

    from deployments.hub import local_name

    target = models_dir / local_name(repo_id)
    if os.path.lexists(target):
        return None
    index = try_to_load_from_cache(repo_id, "model_index.json", cache_dir=cache_dir)
    if isinstance(index, str):
        models_dir.mkdir(parents=True, exist_ok=True)
        target.symlink_to(Path(index).parent, target_is_directory=True)
        return target
    snapshot = _cached_snapshot(repo_id, cache_dir)
    singles = sorted(snapshot.glob("*.safetensors")) if snapshot else []
    if not singles:
        return None
    target.mkdir(parents=True)
    link_cached([p for p in (singles[0], singles[0].with_suffix(".yaml")) if p.exists()], target)
    return target


def _cached_snapshot(repo_id: str, cache_dir: Path | None) -> Path | None:
    """The Hub cache's snapshot folder of `repo_id` at `main`, if any."""
    from huggingface_hub import constants

    root = Path(cache_dir or constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    try:
        commit = (root / "refs" / "main").read_text().strip()
    except OSError:
        return None
    snapshot = root / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def starter_info(starter: Starter, *, timeout: float = CHECK_TIMEOUT) -> StarterInfo:
    """The starter's size, sha256, licence and commit, from one Hub request (no retries).

    Raises:
        NotFoundError naming the repo and file when the Hub does not list them; other
        huggingface_hub and HTTP errors pass through (the caller reports them).
    """
    from huggingface_hub import HfApi

    info = HfApi().model_info(starter.repo_id, files_metadata=True, timeout=timeout)
    sibling = next((s for s in info.siblings or [] if s.rfilename == starter.filename), None)
    if sibling is None:
        raise NotFoundError(f"{starter}: the Hub repo has no such file", field="checkpoint")
    card = info.card_data.to_dict() if info.card_data is not None else {}
    licence = card.get("license")
    return StarterInfo(
        starter=starter,
        revision=info.sha or "main",
        size=sibling.lfs.size if sibling.lfs else sibling.size,
        sha256=sibling.lfs.sha256 if sibling.lfs else None,
        licence=str(licence) if licence else None,
        files=tuple(s.rfilename for s in info.siblings or []),
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as reader:
        while chunk := reader.read(READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download_starter(
    starter: Starter,
    models_dir: Path,
    *,
    progress: ProgressCallback | None = None,
    timeout: float = CHECK_TIMEOUT,
) -> Path:
    """Download a starter into `models_dir`, resumable, checked, placed atomically.

    Args:
        starter: the pinned repo and file.
        models_dir: the first models folder.
        progress: called with (bytes done, total); None: huggingface_hub's console bar.
        timeout: seconds for the Hub check and each network wait.
    Returns:
        The placed file, `models_dir / starter.filename`, with a same-named `.yaml` beside
        it when the repo holds one (A1111's sidecar config).
    Raises:
        NotFoundError (repo or file unknown) or UnusableFileError (unreachable, interrupted:
        the finished bytes are kept for the next try; wrong size or sha256, or not a Stable
        Diffusion checkpoint: the file is deleted), each naming the file.
    Example:
        >>> download_starter(DEFAULT_STARTER, Path("models"))  # doctest: +SKIP
        PosixPath('models/v1-5-pruned-emaonly.safetensors')
    """
    from huggingface_hub import constants, hf_hub_download

    target = models_dir / starter.filename
    partial = models_dir / f".{starter.filename}.partial"
    staged = partial / starter.filename
    try:
        info = starter_info(starter, timeout=timeout)
        log.info(
            "downloading %s (%s, licence %s) into %s",
            starter,
            f"{info.size / 2**30:.2f} GiB" if info.size else "size unknown",
            info.licence or "not stated",
            models_dir,
        )
        partial.mkdir(parents=True, exist_ok=True)
        _resume_download(starter, info, staged, progress=progress, timeout=timeout)
        sidecar = _sidecar(starter.filename)
        if sidecar in info.files:  # small: fetched whole
            hf_hub_download(
                starter.repo_id,
                sidecar,
                revision=info.revision,
                local_dir=partial,
                etag_timeout=timeout,
            )
    except LorastackError:
        raise
    except Exception as error:  # huggingface_hub and its HTTP client raise many types
        reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]
        resumable = staged.is_file() and staged.stat().st_size > 0
        kept = " (the bytes received are kept and the next start resumes)" * resumable
        raise UnusableFileError(
            f"{starter}: the Hub at {constants.ENDPOINT} could not provide it ({reason}){kept}",
            field="checkpoint",
        ) from None
    problem = _check_download(staged, info)
    if problem is not None:
        shutil.rmtree(partial, ignore_errors=True)  # a bad file must not resume
        raise UnusableFileError(f"{starter.filename}: {problem}; the file was not kept")
    if (partial / _sidecar(starter.filename)).is_file():
        os.replace(partial / _sidecar(starter.filename), models_dir / _sidecar(starter.filename))
    _place(staged, target, overwrite=False)
    shutil.rmtree(partial, ignore_errors=True)
    log.info("placed %s", target)
    return target


def _resume_download(
    starter: Starter,
    info: StarterInfo,
    staged: Path,
    *,
    progress: ProgressCallback | None,
    timeout: float,
) -> None:
    """Fetch the checkpoint into `staged`, continuing from the bytes already there with a
    `Range` request (huggingface_hub's own downloads restart from zero after a failure)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(starter.repo_id, starter.filename, revision=info.revision)
    headers = build_hf_headers()
    location = get_hf_file_metadata(url, timeout=timeout, headers=headers).location
    done = staged.stat().st_size if staged.is_file() else 0
    if info.size is not None and done > info.size:
        done = 0  # not a prefix of this file: start again
    if done:
        log.info("resuming %s after %d bytes", starter.filename, done)
    with staged.open("r+b" if staged.exists() else "wb") as writer:
        writer.seek(done)
        writer.truncate()
        http_get(
            location,
            writer,
            resume_size=done,
            headers=headers,
            expected_size=info.size,
            displayed_filename=starter.filename,
            tqdm_class=_progress_bar(progress),
        )


def _check_download(staged: Path, info: StarterInfo) -> str | None:
    """Why a finished download is unusable (size, sha256, not a checkpoint), else None."""
    size = staged.stat().st_size
    if info.size is not None and size != info.size:
        return f"{size} bytes arrived, the Hub lists {info.size}"
    if info.sha256 is not None and (digest := _sha256(staged)) != info.sha256:
        return f"sha256 is {digest}, the Hub lists {info.sha256}"
    try:
        _inspect(staged, "checkpoint")
    except LorastackError as error:
        return error.message
    return None


def first_run(
    settings: Settings,
    folders: ModelFolders,
    *,
    env: Mapping[str, str] | None = None,
    cache_dir: Path | None = None,
    background: bool = False,
) -> FirstRun:
    """Make sure a checkpoint exists on first run; never touches the network when one does.

    Order: any listed checkpoint (usable or not) -> nothing to do; a starter in the Hub
    cache -> linked into the models folder; the flag or offline mode -> the demo, with the
    reason; else the default starter is downloaded (a failure -> the demo, with the reason).
    The folders are rescanned after a file is placed. With `background`, the download is
    returned unstarted (`FirstRun.download`) for the caller to run while the page serves.
    """
    if folders.entries("checkpoint"):
        return FirstRun()
    models_dir = settings.models_dirs[0]
    cached = cached_starter(cache_dir)
    if cached is not None:
        placed = link_cached(cached[1], models_dir)
        log.info("found %s in the Hub cache (preloaded); linked as %s", cached[0], placed)
        folders.scan("checkpoint")
        return FirstRun(checkpoint=placed)
    refusal = download_refusal(settings, env)
    if refusal is not None:
        log.info("first run: %s", refusal)
        return FirstRun(reason=refusal)
    download = BackgroundDownload(DEFAULT_STARTER, models_dir)
    if background:
        return FirstRun(download=download)
    download.run()
    if download.placed is None:
        return FirstRun(reason=download.failure)
    folders.scan("checkpoint")
    return FirstRun(checkpoint=download.placed)
