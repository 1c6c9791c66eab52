"""Getting files in where nobody can copy them by hand (a Space): upload, URL, Hub reference.

Every way in ends in `validate_and_place`: a plain `.safetensors` file name, a size limit,
the header parsed and the architecture detected (a LoRA must be a LoRA; a checkpoint must
be a Stable Diffusion checkpoint), an optional sha256, and only then an atomic move into
the folder that never replaces an existing file unless asked. Data is written into a
hidden `.incoming-*` folder inside the target folder, which the registry never lists and
which is removed whatever happens, so a refused, truncated or interrupted transfer leaves
nothing behind. Pickles are refused here: only the operator puts those in place.

Messages name the file and the folder by name only, never a host path.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.message import Message
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlsplit

from pipelines.architecture import detect_architecture
from pipelines.errors import InvalidRequestError, LorastackError, NotFoundError, UnusableFileError
from pipelines.folders.loras import classify_lora
from pipelines.safeload import PICKLE_EXTENSIONS, read_safetensors_header

if TYPE_CHECKING:
    import httpx

    from pipelines.settings import Settings

log = logging.getLogger(__name__)

Kind = Literal["lora", "checkpoint"]
KINDS: tuple[Kind, ...] = ("lora", "checkpoint")
EXTENSION = ".safetensors"
MAX_NAME_BYTES = 200
CHUNK = 1 << 20
DOWNLOAD_TIMEOUT = 30.0
"""Seconds any single network wait (connect, one read) may take."""
STAGING_PREFIX = ".incoming-"
ProgressCallback = Callable[[int, "int | None"], None]
"""Called with (bytes done, total bytes or None when the server does not say)."""

_UNPORTABLE = re.compile(r'[<>:"|?*]')
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_HUB_REFERENCE = re.compile(
    r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w.-]+))?"
    r"(?:/(?P<file>[^@]+?))?(?:@(?P<rev2>[\w.-]+))?"
)
# Within this process, the no-hard-link fallback's exists-check and rename happen together.
_PLACE_LOCK = threading.Lock()


@dataclass(frozen=True)
class PlacedFile:
    """A file now in its folder, and what it turned out to be."""

    path: Path
    filename: str
    kind: Kind
    size: int
    sha256: str
    architecture: str  # "SD1", "SDXL", ...; "SD1/SD2" when a LoRA's keys cannot tell
    replaced: bool
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class UrlReference:
    """A direct link to a `.safetensors` file."""

    url: str

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True)
class HubReference:
    """`org/repo`, optionally one file in it and a revision (branch, tag or commit)."""

    repo_id: str
    filename: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        file = f"/{self.filename}" if self.filename else ""
        revision = f"@{self.revision}" if self.revision else ""
        return f"{self.repo_id}{file}{revision}"


# --------------------------------------------------------------------------- checks


def _check_kind(kind: str) -> Kind:
    if kind not in KINDS:
        raise InvalidRequestError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return kind  # type: ignore[return-value]


def safe_filename(filename: str) -> str:
    """A plain `.safetensors` file name, or InvalidRequestError saying what is wrong.

    Surrounding and repeated spaces are tidied, characters other systems cannot store
    (`<>:"|?*`) become `_` and the extension is lower-cased; anything that could name
    another place (separators, `..`, hidden names, NUL and control characters) is refused.

    Example:
        >>> safe_filename("  My Ink  LoRA.SafeTensors")
        'My Ink LoRA.safetensors'
    """
    name = unicodedata.normalize("NFC", filename).strip()
    shown = repr(filename)
    if not name:
        raise InvalidRequestError("the file name is empty", field="filename")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidRequestError(f"{shown}: control characters in a file name", field="filename")
    if "/" in name or "\\" in name:
        raise InvalidRequestError(
            f"{shown}: a plain file name is needed, not a path", field="filename"
        )
    if ".." in name:
        raise InvalidRequestError(f"{shown}: '..' is not allowed in a file name", field="filename")
    if name.startswith("."):
        raise InvalidRequestError(
            f"{shown}: hidden names (a leading '.') are not allowed", field="filename"
        )
    name = " ".join(_UNPORTABLE.sub("_", name).split())
    stem, extension = os.path.splitext(name)
    if extension.lower() in PICKLE_EXTENSIONS:
        raise InvalidRequestError(
            f"{shown}: {extension} files are pickles, which can run code when loaded; only "
            ".safetensors files are accepted here (convert it, or ask the operator to add it)",
            field="filename",
        )
    if extension.lower() != EXTENSION or not stem.strip(" ."):
        raise InvalidRequestError(
            f"{shown}: only .safetensors files are accepted", field="filename"
        )
    name = stem + EXTENSION
    if len(name.encode()) > MAX_NAME_BYTES:
        raise InvalidRequestError(f"{shown}: longer than {MAX_NAME_BYTES} bytes", field="filename")
    return name


def _expected_digest(expected_sha256: str | None) -> str | None:
    if not expected_sha256:
        return None
    digest = expected_sha256.strip().lower().removeprefix("sha256:")
    if not _SHA256.fullmatch(digest):
        raise InvalidRequestError(
            f"sha256 {expected_sha256!r} is not 64 hexadecimal digits", field="sha256"
        )
    return digest


def _megabytes(size: int) -> str:
    return f"{size / (1024 * 1024):,.1f} MB"


def _too_big(name: str, size: int | None, max_bytes: int) -> UnusableFileError:
    told = f"{_megabytes(size)}, " if size is not None else ""
    return UnusableFileError(f"{name}: {told}over the {_megabytes(max_bytes)} limit")


def _exists(name: str, folder: Path) -> InvalidRequestError:
    return InvalidRequestError(
        f"{name}: a file of that name is already in {folder.name}/; choose another name or "
        "ask to replace it",
        field="filename",
    )


def _check_target(target: Path, overwrite: bool) -> None:
    """Fail before any transfer when the placement would fail anyway."""
    if target.is_dir():
        raise InvalidRequestError(
            f"{target.name}: a folder of that name is in {target.parent.name}/", field="filename"
        )
    if not overwrite and os.path.lexists(target):
        raise _exists(target.name, target.parent)


def _inspect(staged: Path, kind: Kind) -> tuple[str, tuple[str, ...]]:
    """(architecture, notes) from the header alone; UnusableFileError naming the file."""
    if kind == "lora":
        facts = classify_lora(staged)  # the registry's own reading: listed exactly as checked here
        if facts.error:
            raise UnusableFileError(facts.error)
        return "/".join(facts.families), facts.notes
    header = read_safetensors_header(staged)
    shapes = {key: info.shape for key, info in header.tensors.items()}
    try:
        detection = detect_architecture(shapes, source=staged.name)
    except ValueError as error:
        raise UnusableFileError(str(error)) from None
    return detection.architecture.value, ()


def _place(staged: Path, target: Path, overwrite: bool) -> bool:
    """Move `staged` to `target` atomically; True when it replaced a file."""
    if overwrite:
        replaced = os.path.lexists(target)
        os.replace(staged, target)
        return replaced
    try:
        os.link(staged, target)  # fails, instead of replacing, when target exists
    except FileExistsError:
        raise _exists(target.name, target.parent) from None
    except OSError:  # a file system without hard links (some FUSE bucket mounts)
        with _PLACE_LOCK:
            if os.path.lexists(target):
                raise _exists(target.name, target.parent) from None
            os.rename(staged, target)
    return False


@contextmanager
def _staging(folder: Path) -> Iterator[Path]:
    """A hidden scratch folder inside `folder` (same file system: the final move is a
    rename), removed afterwards whatever happened."""
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _finish(
    staged: Path,
    kind: Kind,
    target: Path,
    *,
    size: int,
    digest: str,
    expected: str | None,
    overwrite: bool,
) -> PlacedFile:
    """The checks every way in shares, once the data is complete in the staging folder."""
    if expected and digest != expected:
        raise UnusableFileError(
            f"{target.name}: sha256 is {digest}, expected {expected}; the file was not kept",
            field="sha256",
        )
    architecture, notes = _inspect(staged, kind)
    replaced = _place(staged, target, overwrite)
    log.info("placed %s %s (%s, %s)", kind, target.name, architecture, _megabytes(size))
    return PlacedFile(target, target.name, kind, size, digest, architecture, replaced, notes)


def _copy(source: Path, staged: Path, name: str, max_bytes: int) -> tuple[int, str]:
    """Copy while hashing, refusing as soon as more than `max_bytes` arrive."""
    digest = hashlib.sha256()
    size = 0
    with source.open("rb") as reader, staged.open("wb") as writer:
        while chunk := reader.read(CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise _too_big(name, None, max_bytes)
            digest.update(chunk)
            writer.write(chunk)
    return size, digest.hexdigest()


def _hash_file(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    with path.open("rb") as reader:
        while chunk := reader.read(CHUNK):
            digest.update(chunk)
    return path.stat().st_size, digest.hexdigest()


# --------------------------------------------------------------------------- uploads


def validate_and_place(
    source: Path,
    kind: Kind,
    folder: Path,
    *,
    filename: str,
    max_bytes: int,
    overwrite: bool = False,
    expected_sha256: str | None = None,
) -> PlacedFile:
    """Check a file and move a copy of it into `folder` under `filename`.

    Args:
        source: the received file (e.g. Gradio's upload temp file); it is not changed.
        kind: "lora" (must be a LoRA) or "checkpoint" (must be an SD checkpoint).
        folder: the LoRA or models folder to place it in (created if missing).
        filename: the name the user gave; checked with `safe_filename`.
        max_bytes: size limit.
        overwrite: replace a file of the same name (otherwise that is refused).
        expected_sha256: refuse the file unless its sha256 is this.
    Returns:
        The PlacedFile. Call `Engine.rescan()` afterwards to list it.
    Raises:
        InvalidRequestError (name, kind, existing file) or UnusableFileError (size, header,
        architecture, sha256), each naming the file; nothing is left in `folder`.
    Example:
        >>> validate_and_place(Path("/tmp/x"), "lora", Path("loras"), filename="ink.safetensors",
        ...                    max_bytes=2**30)  # doctest: +SKIP
    """
    kind = _check_kind(kind)
    name = safe_filename(filename)
    expected = _expected_digest(expected_sha256)
    target = folder / name
    _check_target(target, overwrite)
    try:
        size = source.stat().st_size
    except OSError as error:
        raise UnusableFileError(f"{name}: the upload cannot be read ({error.strerror})") from None
    if size > max_bytes:
        raise _too_big(name, size, max_bytes)
    with _staging(folder) as staging:
        staged = staging / name
        size, digest = _copy(source, staged, name, max_bytes)
        return _finish(
            staged, kind, target, size=size, digest=digest, expected=expected, overwrite=overwrite
        )


# --------------------------------------------------------------------------- references


def parse_reference(text: str) -> UrlReference | HubReference:
    """What the user pasted: a direct `http(s)://` link, or a Hub reference
    `org/repo[/path/file.safetensors]` with an optional `@revision` after the repo or at
    the end.

    Example:
        >>> parse_reference("org/loras@v2/ink.safetensors")
        HubReference(repo_id='org/loras', filename='ink.safetensors', revision='v2')
    """
    value = text.strip()
    accepted = (
        "paste an https:// link to a .safetensors file, or a Hub reference such as "
        "org/repo, org/repo/file.safetensors or org/repo/file.safetensors@revision"
    )
    if not value:
        raise InvalidRequestError(f"nothing to download: {accepted}", field="reference")
    scheme = value.split(":", 1)[0].lower() if ":" in value else ""
    if scheme in ("http", "https"):
        parts = urlsplit(value)
        if not parts.hostname:
            raise InvalidRequestError(f"{value!r}: the link names no host", field="reference")
        return UrlReference(value)
    if scheme and "/" not in scheme:
        raise InvalidRequestError(
            f"{value!r}: {scheme}: links are not supported; {accepted}", field="reference"
        )
    match = _HUB_REFERENCE.fullmatch(value)
    if match is None or (match["rev"] and match["rev2"]):
        raise InvalidRequestError(
            f"{value!r} is not a link or a Hub reference: {accepted}", field="reference"
        )
    file = match["file"]
    if file is not None:
        segments = file.split("/")
        if any(s in ("", ".", "..") for s in segments) or "\\" in file:
            raise InvalidRequestError(
                f"{value!r}: bad file path {file!r} in the repo", field="reference"
            )
        if not file.lower().endswith(EXTENSION):
            raise InvalidRequestError(
                f"{value!r}: only .safetensors files can be downloaded", field="reference"
            )
    return HubReference(match["repo"], file, match["rev"] or match["rev2"])


def _address_refusal(host: str) -> str | None:
    """Why `host` may not be fetched from without `allow_http`: it is, or resolves to, a
    loopback, private, link-local or reserved address (the server's own network)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as error:
        return f"the host {host} cannot be resolved ({error.strerror or error})"
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global:
            return (
                f"{host} is a local or private address ({address}); only public hosts are allowed"
            )
    return None


class _Refused(Exception):
    """Raised inside httpx's request hook (a redirect to a refused place)."""


RequestRefused = _Refused
"""What `guard_requests`' hook raises, for the other downloaders (Civitai) that share it."""


def _guard(allow_http: bool) -> Callable[[httpx.Request], None]:
    def check(request: httpx.Request) -> None:
        if request.url.scheme != "https" and not (allow_http and request.url.scheme == "http"):
            raise _Refused(f"only https:// links are allowed, not {request.url.scheme}://")
        if not allow_http:
            reason = _address_refusal(request.url.host)
            if reason:
                raise _Refused(reason)

    return check


guard_requests = _guard
"""httpx's request hook: https to public hosts only, unless `allow_http`."""


def _name_from_response(response: httpx.Response) -> str | None:
    """The file name from Content-Disposition (as sites like civitai send), if any."""
    header = response.headers.get("content-disposition")
    if not header:
        return None
    message = Message()
    message["content-disposition"] = header
    name = message.get_filename()
    return PurePosixPath(name.replace("\\", "/")).name if name else None


def _url_name(url: str) -> str | None:
    last = unquote(PurePosixPath(urlsplit(url).path).name)
    return last if last.lower().endswith(EXTENSION) else None


def download_url(
    url: str,
    kind: Kind,
    folder: Path,
    *,
    max_bytes: int,
    expected_sha256: str | None = None,
    filename: str | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    allow_http: bool = False,
    timeout: float = DOWNLOAD_TIMEOUT,
    transport: httpx.BaseTransport | None = None,
    headers: dict[str, str] | None = None,
) -> PlacedFile:
    """Download a `.safetensors` file by direct link, then check and place it.

    Only `https://` links to public hosts are fetched (redirects included): a public server
    must not become a way into its own network. `allow_http=True` lifts both rules (tests
    on 127.0.0.1, an operator's own LAN).

    Args:
        url: the link. The file name is `filename`, else the link's last path segment, else
            the server's Content-Disposition, else the redirected link's last segment.
        kind, folder, max_bytes, expected_sha256, overwrite: as in `validate_and_place`.
        progress: called with (bytes done, total or None) after every chunk.
        timeout: seconds for any one network wait.
        transport: an httpx transport (tests, proxies).
        headers: extra request headers (a site's `Authorization`; httpx drops it on a
            redirect to another host).
    Returns:
        The PlacedFile. Raises InvalidRequestError (link, name), NotFoundError (HTTP 404/410)
        or UnusableFileError (transfer failed or truncated, too big, not usable); nothing
        partial is left in `folder`.
    """
    import httpx

    kind = _check_kind(kind)
    expected = _expected_digest(expected_sha256)
    reference = parse_reference(url)
    if not isinstance(reference, UrlReference):
        raise InvalidRequestError(f"{url!r} is not an http(s):// link", field="reference")
    guard = _guard(allow_http)
    try:
        guard(httpx.Request("GET", url))
    except _Refused as error:
        raise InvalidRequestError(f"{url}: {error}", field="reference") from None
    chosen = filename or _url_name(url)
    name = safe_filename(chosen) if chosen else None
    if name:
        _check_target(folder / name, overwrite)
    client = httpx.Client(
        transport=transport,
        follow_redirects=True,
        timeout=httpx.Timeout(timeout),
        headers={"Accept-Encoding": "identity", **(headers or {})},
        event_hooks={"request": [guard]},
        trust_env=False,
    )
    with _staging(folder) as staging, client:
        try:
            with client.stream("GET", url) as response:
                if response.status_code in (404, 410):
                    raise NotFoundError(
                        f"{url}: the server has no such file (HTTP {response.status_code})",
                        field="reference",
                    )
                if response.status_code >= 400:
                    raise UnusableFileError(
                        f"{url}: the server answered HTTP {response.status_code}; nothing was kept",
                        field="reference",
                    )
                if name is None:
                    offered = _name_from_response(response) or _url_name(str(response.url))
                    if offered is None:
                        raise InvalidRequestError(
                            f"{url}: the link names no .safetensors file; give a file name",
                            field="filename",
                        )
                    name = safe_filename(offered)
                    _check_target(folder / name, overwrite)
                length = response.headers.get("content-length")
                total = int(length) if length and length.isdigit() else None
                if total is not None and total > max_bytes:
                    raise _too_big(name, total, max_bytes)
                staged = staging / name
                digest = hashlib.sha256()
                size = 0
                with staged.open("wb") as writer:
                    for chunk in response.iter_bytes(CHUNK):
                        size += len(chunk)
                        if size > max_bytes:
                            raise _too_big(name, None, max_bytes)
                        digest.update(chunk)
                        writer.write(chunk)
                        if progress is not None:
                            progress(size, total)
                if total is not None and response.num_bytes_downloaded != total:
                    raise UnusableFileError(
                        f"{name}: the transfer was cut short ({response.num_bytes_downloaded} "
                        f"of {total} bytes); nothing was kept"
                    )
        except _Refused as error:
            raise InvalidRequestError(f"{url}: {error}", field="reference") from None
        except httpx.HTTPError as error:
            shown = name or url
            reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]
            raise UnusableFileError(
                f"{shown}: the download failed ({reason}); nothing was kept"
            ) from None
        return _finish(
            staged,
            kind,
            folder / name,
            size=size,
            digest=digest.hexdigest(),
            expected=expected,
            overwrite=overwrite,
        )


def _progress_bar(progress: ProgressCallback | None) -> type | None:
    """A tqdm stand-in for huggingface_hub that reports to `progress`."""
    if progress is None:
        return None

    class Bar:
        def __init__(self, *, total: int | None = None, initial: int = 0, **_: Any) -> None:
            self.total = total
            self.n = initial

        def update(self, count: int = 1) -> None:
            self.n += count
            progress(self.n, self.total)

        def close(self) -> None:
            """Nothing to release."""

        def __enter__(self) -> Bar:
            return self

        def __exit__(self, *exc: object) -> None:
            self.close()

    return Bar


def _pick_file(reference: HubReference, files: list[str]) -> str:
    """The file a Hub reference means: the one it names, else the repo's only .safetensors."""
    weights = sorted(f for f in files if f.lower().endswith(EXTENSION))
    if reference.filename is not None:
        if reference.filename not in files:
            shown = ", ".join(weights[:10]) or "none"
            raise NotFoundError(
                f"{reference}: {reference.repo_id} has no file {reference.filename} "
                f"(its .safetensors files: {shown})",
                field="reference",
            )
        return reference.filename
    if len(weights) == 1:
        return weights[0]
    if not weights:
        raise NotFoundError(f"{reference}: the repo holds no .safetensors file", field="reference")
    listed = ", ".join(weights[:10]) + (", ..." if len(weights) > 10 else "")
    raise InvalidRequestError(
        f"{reference}: the repo holds {len(weights)} .safetensors files ({listed}); name one, "
        f"e.g. {reference.repo_id}/{weights[0]}",
        field="reference",
    )


def download_hub(
    reference: str | HubReference,
    kind: Kind,
    folder: Path,
    *,
    max_bytes: int,
    expected_sha256: str | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    token: str | bool | None = None,
) -> PlacedFile:
    """Download one `.safetensors` file from a Hub repo, then check and place it.

    huggingface_hub does the transfer, so HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE and the
    HF_HUB_*_TIMEOUT variables apply. The file is fetched from the revision's commit as
    listed (every request sees the same files) into the staging folder, never the HF cache.

    Args:
        reference: `org/repo`, `org/repo/path/file.safetensors`, `@revision` optional
            (see `parse_reference`), or a HubReference. With no file named, the repo must
            hold exactly one `.safetensors` file.
        kind, folder, max_bytes, expected_sha256, overwrite: as in `validate_and_place`.
        progress: called with (bytes done, total) while downloading.
        token: a Hub token for gated or private repos (default: HF_TOKEN / the login;
            False: none, so a user's request never borrows the server's own token).
    Returns:
        The PlacedFile. Raises NotFoundError (repo, revision or file unknown), InvalidRequestError
        (bad reference, several files) or UnusableFileError (offline, unreachable, too big,
        not usable); nothing partial is left in `folder`.
    """
    from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    kind = _check_kind(kind)
    expected = _expected_digest(expected_sha256)
    if isinstance(reference, str):
        parsed = parse_reference(reference)
        if not isinstance(parsed, HubReference):
            raise InvalidRequestError(f"{reference!r} is not a Hub reference", field="reference")
        reference = parsed
    if constants.HF_HUB_OFFLINE:
        raise UnusableFileError(
            f"{reference}: this server runs offline (HF_HUB_OFFLINE is set), so nothing can be "
            "downloaded from the Hub; upload the file instead",
            field="reference",
        )
    timeout = constants.HF_HUB_ETAG_TIMEOUT
    try:
        # One request without retries: fails fast when the Hub is unreachable.
        info = HfApi().model_info(
            reference.repo_id, revision=reference.revision, timeout=timeout, token=token
        )
        path = _pick_file(reference, [s.rfilename for s in info.siblings or []])
        name = safe_filename(PurePosixPath(path).name)
        _check_target(folder / name, overwrite)
        url = hf_hub_url(reference.repo_id, path, revision=info.sha)
        size = get_hf_file_metadata(url, token=token, timeout=timeout).size
        if size is not None and size > max_bytes:
            raise _too_big(name, size, max_bytes)
        with _staging(folder) as staging:
            downloaded = hf_hub_download(
                reference.repo_id,
                path,
                revision=info.sha,
                local_dir=staging / "hub",
                token=token,
                tqdm_class=_progress_bar(progress),
            )
            staged = staging / name
            os.rename(downloaded, staged)
            size, digest = _hash_file(staged)
            if size > max_bytes:
                raise _too_big(name, size, max_bytes)
            return _finish(
                staged,
                kind,
                folder / name,
                size=size,
                digest=digest,
                expected=expected,
                overwrite=overwrite,
            )
    except LorastackError:
        raise
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as error:
        raise NotFoundError(
            f"{reference}: not found on the Hub at {constants.ENDPOINT} ({type(error).__name__}; "
            "a private or gated repo needs a token)",
            field="reference",
        ) from None
    except Exception as error:  # huggingface_hub and its HTTP client raise many types
        reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]
        raise UnusableFileError(
            f"{reference}: the Hub at {constants.ENDPOINT} could not provide it ({reason}); "
            "nothing was kept",
            field="reference",
        ) from None


# --------------------------------------------------------------------------- front ends


def download_reference(
    text: str,
    kind: Kind,
    folder: Path,
    *,
    max_bytes: int,
    expected_sha256: str | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    allow_http: bool = False,
) -> PlacedFile:
    """What a "Download" button calls: a pasted link or Hub reference, placed in `folder`."""
    reference = parse_reference(text)
    common: dict[str, Any] = {
        "max_bytes": max_bytes,
        "expected_sha256": expected_sha256,
        "overwrite": overwrite,
        "progress": progress,
    }
    if isinstance(reference, UrlReference):
        return download_url(reference.url, kind, folder, allow_http=allow_http, **common)
    return download_hub(reference, kind, folder, **common)


@dataclass(frozen=True)
class IngestPolicy:
    """The admin's rules for getting files in, and where each kind goes.

    Checkpoints (uploaded or downloaded) are refused unless `--allow-checkpoint-uploads`:
    they are gigabytes each, and a public Space should not fill its disk on request.

    Example:
        >>> policy = IngestPolicy.from_settings(settings)  # doctest: +SKIP
        >>> placed = policy.upload(Path(tmp), "lora", filename="ink.safetensors")  # doctest: +SKIP
        >>> engine.rescan()  # doctest: +SKIP
    """

    lora_folder: Path
    checkpoint_folder: Path
    max_bytes: int
    uploads: bool = True
    downloads: bool = True
    checkpoints: bool = False
    allow_http: bool = False  # plain http and local hosts (tests, an operator's own LAN)

    @classmethod
    def from_settings(cls, settings: Settings) -> IngestPolicy:
        """New files go to the first LoRA / models folder (a mounted bucket, when configured)."""
        return cls(
            lora_folder=settings.loras_dirs[0],
            checkpoint_folder=settings.models_dirs[0],
            max_bytes=settings.max_upload_bytes,
            uploads=not settings.disable_uploads,
            downloads=not settings.disable_downloads,
            checkpoints=settings.allow_checkpoint_uploads,
        )

    def folder(self, kind: Kind) -> Path:
        return self.lora_folder if _check_kind(kind) == "lora" else self.checkpoint_folder

    def check(self, action: Literal["upload", "download"], kind: Kind) -> None:
        """InvalidRequestError when the admin switched this way in off."""
        if action == "upload" and not self.uploads:
            raise InvalidRequestError("uploads are disabled on this server (--disable-uploads)")
        if action == "download" and not self.downloads:
            raise InvalidRequestError("downloads are disabled on this server (--disable-downloads)")
        if _check_kind(kind) == "checkpoint" and not self.checkpoints:
            raise InvalidRequestError(
                "adding checkpoints is disabled on this server (the admin can allow it with "
                "--allow-checkpoint-uploads); LoRAs are accepted"
            )

    def upload(
        self,
        source: Path,
        kind: Kind,
        *,
        filename: str,
        overwrite: bool = False,
        expected_sha256: str | None = None,
    ) -> PlacedFile:
        """`validate_and_place` under the admin's rules."""
        self.check("upload", kind)
        return validate_and_place(
            source,
            kind,
            self.folder(kind),
            filename=filename,
            max_bytes=self.max_bytes,
            overwrite=overwrite,
            expected_sha256=expected_sha256,
        )

    def download(
        self,
        text: str,
        kind: Kind,
        *,
        overwrite: bool = False,
        expected_sha256: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> PlacedFile:
        """`download_reference` under the admin's rules."""
        self.check("download", kind)
        return download_reference(
            text,
            kind,
            self.folder(kind),
            max_bytes=self.max_bytes,
            expected_sha256=expected_sha256,
            overwrite=overwrite,
            progress=progress,
            allow_http=self.allow_http,
        )


def temporary_storage_warning(folder: Path, env: dict[str, str] | None = None) -> str | None:
    """On a Space, a sentence for the UI when `folder` is on the Space's own disk (wiped at
    every restart) rather than on a mounted storage bucket; None elsewhere.

    A bucket is a mount: its folder lives on another device than the app's own files.
    """
    from pipelines.settings import PROJECT_DIR

    env = dict(os.environ) if env is None else env
    if "SPACE_ID" not in env:
        return None
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        temporary = probe.stat().st_dev == PROJECT_DIR.stat().st_dev
    except OSError:
        temporary = True
    if not temporary:
        return None
    return (
        f"Files added here go to {folder.name}/ on this Space's temporary disk: a restart "
        "wipes them. For lasting files, mount a storage bucket and point --data-dir "
        "(LORASTACK_DATA_DIR) or --lora-dir at it, or commit them to the Space repo."
    )
