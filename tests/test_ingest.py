"""Getting files in: upload checks, downloads from a local HTTP server (truncated, failing,
oversize), Hub references through the fake Hub (in a subprocess), and the admin's rules.

Every failure must leave the target folder exactly as it was: no partial file, no staging
folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import save

from deployments.ingest import (
    HubReference,
    IngestPolicy,
    UrlReference,
    download_hub,
    download_url,
    parse_reference,
    safe_filename,
    temporary_storage_warning,
    validate_and_place,
)
from pipelines.errors import InvalidRequestError, NotFoundError, UnusableFileError
from pipelines.loading import LoadedModel
from pipelines.settings import PROJECT_DIR, Settings
from tests.fake_hub import FakeHub
from tests.ldm_export import save_single_file
from tests.test_lora import SD1_MODULES, make_kohya, sd1_keys
from tests.test_lora_registry import LoraLibrary

MB = 1024 * 1024


@pytest.fixture(scope="module")
def lora_bytes(tiny_sd1: LoadedModel) -> bytes:
    state = make_kohya(tiny_sd1.pipe, SD1_MODULES, sd1_keys(SD1_MODULES), seed=1)
    return save({k: v.contiguous() for k, v in state.items()}, {"ss_output_name": "ink"})


@pytest.fixture(scope="module")
def other_lora_bytes(tiny_sd1: LoadedModel) -> bytes:
    state = make_kohya(tiny_sd1.pipe, SD1_MODULES, sd1_keys(SD1_MODULES), seed=2)
    return save({k: v.contiguous() for k, v in state.items()})


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory: pytest.TempPathFactory, tiny_sd1: LoadedModel) -> bytes:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_single_file(tiny_sd1.pipe, path, text_encoder_layout="hf")
    return path.read_bytes()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def listing(folder: Path) -> list[str]:
    """Everything in the folder, hidden names included (a leftover would show here)."""
    return sorted(os.listdir(folder)) if folder.exists() else []


def source(tmp_path: Path, data: bytes, name: str = "upload.bin") -> Path:
    """A received upload, outside the target folder (like Gradio's temp file)."""
    path = tmp_path / "received" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("ink.safetensors", "ink.safetensors"),
        ("  My Ink  LoRA.SafeTensors ", "My Ink LoRA.safetensors"),
        ('a:b?"c".safetensors', "a_b__c_.safetensors"),
        ("über-stil.safetensors", "über-stil.safetensors"),
    ],
)
def test_names_are_tidied(given: str, expected: str) -> None:
    assert safe_filename(given) == expected


@pytest.mark.parametrize(
    ("given", "reason"),
    [
        ("../ink.safetensors", "not a path"),
        ("styles/ink.safetensors", "not a path"),
        ("..\\ink.safetensors", "not a path"),
        ("/etc/ink.safetensors", "not a path"),
        ("ink..safetensors", "'..'"),
        (".ink.safetensors", "hidden"),
        ("ink\0.safetensors", "control characters"),
        ("ink\n.safetensors", "control characters"),
        ("", "empty"),
        ("ink.ckpt", "pickles"),
        ("ink.PT", "pickles"),
        ("ink.txt", "only .safetensors"),
        ("ink", "only .safetensors"),
        (" .safetensors", "hidden"),
        ("x" * 250 + ".safetensors", "longer than"),
    ],
)
def test_bad_names_are_refused(given: str, reason: str) -> None:
    with pytest.raises(InvalidRequestError, match=reason):
        safe_filename(given)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("https://example.com/a/ink.safetensors", UrlReference("https://example.com/a/ink.safetensors")),
        ("  org/repo ", HubReference("org/repo")),
        ("org/repo/ink.safetensors", HubReference("org/repo", "ink.safetensors")),
        ("org/repo/sub/ink.safetensors@v2", HubReference("org/repo", "sub/ink.safetensors", "v2")),
        ("org/repo@main/ink.safetensors", HubReference("org/repo", "ink.safetensors", "main")),
        ("org/repo@refs-pr-1", HubReference("org/repo", None, "refs-pr-1")),
    ],
)  # fmt: skip
def test_references(text: str, expected: object) -> None:
    assert parse_reference(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "nothing to download"),
        ("ftp://example.com/ink.safetensors", "not supported"),
        ("file:///etc/passwd", "not supported"),
        ("https:///ink.safetensors", "names no host"),
        ("ink", "not a link or a Hub reference"),
        ("org/repo/../secret.safetensors", "bad file path"),
        ("org/repo/ink.ckpt", "only .safetensors"),
        ("org/repo@a/ink.safetensors@b", "not a link or a Hub reference"),
    ],
)
def test_bad_references(text: str, reason: str) -> None:
    with pytest.raises(InvalidRequestError, match=reason):
        parse_reference(text)


# ---------------------------------------------------------------------------- uploads


def test_upload_is_placed_and_listed(tmp_path: Path, lora_bytes: bytes) -> None:
    folder = tmp_path / "loras"
    upload = source(tmp_path, lora_bytes)
    placed = validate_and_place(
        upload,
        "lora",
        folder,
        filename="My Ink.safetensors",
        max_bytes=MB * 10,
        expected_sha256="SHA256:" + sha(lora_bytes).upper(),
    )
    assert placed.path == folder / "My Ink.safetensors" and placed.filename == "My Ink.safetensors"
    assert placed.size == len(lora_bytes) and placed.sha256 == sha(lora_bytes)
    assert placed.architecture and set(placed.architecture.split("/")) <= {"SD1", "SD2", "SDXL"}
    assert not placed.replaced
    assert placed.path.read_bytes() == lora_bytes
    assert upload.read_bytes() == lora_bytes  # the source is left alone
    assert listing(folder) == ["My Ink.safetensors"]
    library = LoraLibrary([folder])
    assert [e.name for e in library.scan() if e.usable] == ["My Ink"]


def test_existing_file_is_replaced_only_when_asked(
    tmp_path: Path, lora_bytes: bytes, other_lora_bytes: bytes
) -> None:
    folder = tmp_path / "loras"
    validate_and_place(source(tmp_path, lora_bytes), "lora", folder, filename="ink.safetensors",
                       max_bytes=MB * 10)  # fmt: skip
    newer = source(tmp_path, other_lora_bytes, "newer.bin")
    with pytest.raises(
        InvalidRequestError, match="ink.safetensors: a file of that name is already"
    ):
        validate_and_place(newer, "lora", folder, filename="ink.safetensors", max_bytes=MB * 10)
    assert (folder / "ink.safetensors").read_bytes() == lora_bytes
    assert listing(folder) == ["ink.safetensors"]
    placed = validate_and_place(
        newer, "lora", folder, filename="ink.safetensors", max_bytes=MB * 10, overwrite=True
    )
    assert placed.replaced and (folder / "ink.safetensors").read_bytes() == other_lora_bytes
    assert listing(folder) == ["ink.safetensors"]


def test_checkpoint_offered_as_lora_is_refused(tmp_path: Path, checkpoint_bytes: bytes) -> None:
    folder = tmp_path / "loras"
    folder.mkdir()
    with pytest.raises(UnusableFileError) as caught:
        validate_and_place(source(tmp_path, checkpoint_bytes), "lora", folder,
                           filename="model.safetensors", max_bytes=MB * 500)  # fmt: skip
    assert caught.value.message.startswith("model.safetensors: not a LoRA")
    assert "full Stable Diffusion checkpoint (put it in models/)" in caught.value.message
    assert listing(folder) == []


def test_checkpoints_are_detected_and_loras_refused_as_checkpoints(
    tmp_path: Path, checkpoint_bytes: bytes, lora_bytes: bytes
) -> None:
    folder = tmp_path / "models"
    placed = validate_and_place(source(tmp_path, checkpoint_bytes), "checkpoint", folder,
                                filename="tiny.safetensors", max_bytes=MB * 500)  # fmt: skip
    assert placed.architecture == "SD1" and placed.kind == "checkpoint"
    with pytest.raises(UnusableFileError, match="ink.safetensors: .*looks like a LoRA"):
        validate_and_place(source(tmp_path, lora_bytes), "checkpoint", folder,
                           filename="ink.safetensors", max_bytes=MB * 500)  # fmt: skip
    assert listing(folder) == ["tiny.safetensors"]


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda data: data[:-7], "ink.safetensors: truncated"),
        (lambda data: b"", "ink.safetensors: empty file"),
        (lambda data: b"PK\x03\x04" + data, "ink.safetensors: header length field says"),
    ],
)
def test_damaged_files_are_refused(
    tmp_path: Path, lora_bytes: bytes, damage: Any, reason: str
) -> None:
    folder = tmp_path / "loras"
    with pytest.raises(UnusableFileError, match=reason):
        validate_and_place(source(tmp_path, damage(lora_bytes)), "lora", folder,
                           filename="ink.safetensors", max_bytes=MB * 10)  # fmt: skip
    assert listing(folder) == []


def test_size_and_sha256_are_checked(tmp_path: Path, lora_bytes: bytes) -> None:
    folder = tmp_path / "loras"
    upload = source(tmp_path, lora_bytes)
    with pytest.raises(UnusableFileError, match=r"ink.safetensors: .* over the 0.0 MB limit"):
        validate_and_place(upload, "lora", folder, filename="ink.safetensors", max_bytes=1000)
    with pytest.raises(UnusableFileError, match=f"sha256 is {sha(lora_bytes)}, expected 0+;"):
        validate_and_place(upload, "lora", folder, filename="ink.safetensors", max_bytes=MB * 10,
                           expected_sha256="0" * 64)  # fmt: skip
    with pytest.raises(InvalidRequestError, match="not 64 hexadecimal digits"):
        validate_and_place(upload, "lora", folder, filename="ink.safetensors", max_bytes=MB * 10,
                           expected_sha256="abc")  # fmt: skip
    with pytest.raises(InvalidRequestError, match="kind must be one of lora, checkpoint"):
        validate_and_place(upload, "vae", folder, filename="ink.safetensors", max_bytes=MB)  # type: ignore[arg-type]
    assert listing(folder) == []


# ---------------------------------------------------------------------------- policy


def test_policy_follows_the_admin_flags(tmp_path: Path, lora_bytes: bytes) -> None:
    settings = Settings(data_dir=tmp_path, max_upload_mb=1, disable_downloads=True)
    policy = IngestPolicy.from_settings(settings)
    assert policy.folder("lora") == tmp_path / "loras"
    assert policy.folder("checkpoint") == tmp_path / "models"
    assert policy.max_bytes == MB
    placed = policy.upload(source(tmp_path, lora_bytes), "lora", filename="ink.safetensors")
    assert placed.path == tmp_path / "loras" / "ink.safetensors"
    with pytest.raises(InvalidRequestError, match="--allow-checkpoint-uploads"):
        policy.upload(source(tmp_path, lora_bytes), "checkpoint", filename="x.safetensors")
    with pytest.raises(InvalidRequestError, match="--disable-downloads"):
        policy.download("org/repo", "lora")
    closed = IngestPolicy.from_settings(Settings(data_dir=tmp_path, disable_uploads=True))
    with pytest.raises(InvalidRequestError, match="--disable-uploads"):
        closed.upload(source(tmp_path, lora_bytes), "lora", filename="two.safetensors")
    assert listing(tmp_path / "loras") == ["ink.safetensors"]


def test_temporary_disk_warning_only_on_a_space() -> None:
    assert temporary_storage_warning(PROJECT_DIR / "loras", {}) is None
    warning = temporary_storage_warning(PROJECT_DIR / "loras", {"SPACE_ID": "me/space"})
    assert warning is not None and "restart wipes them" in warning and "loras/" in warning


# ---------------------------------------------------------------------------- URL downloads


class FileServer:
    """A local HTTP server whose routes misbehave on purpose. `routes` maps a path to
    (status, headers, body, how): how is "ok", "lie" (Content-Length larger than the body,
    then the connection closes) or "drop" (chunked, closed before the last chunk)."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, dict[str, str], bytes, str]] = {}
        handler = type("Handler", (_Handler,), {"server_routes": self.routes})
        self.server = _QuietServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        """A client that hangs up early (a refused download) is expected here."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_routes: dict[str, tuple[int, dict[str, str], bytes, str]]

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""

    def do_GET(self) -> None:
        status, headers, body, how = self.server_routes.get(
            self.path, (404, {}, b"no such file", "ok")
        )
        self.send_response(status)
        self.send_header("Connection", "close")
        for key, value in headers.items():
            self.send_header(key, value)
        if how == "drop":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            half = body[: len(body) // 2]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(half), half))
            self.wfile.flush()
        elif how == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for start in range(0, len(body), 4096):
                piece = body[start : start + 4096]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        else:
            extra = 1000 if how == "lie" else 0
            self.send_header("Content-Length", str(len(body) + extra))
            self.end_headers()
            self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture(scope="module")
def server(lora_bytes: bytes, checkpoint_bytes: bytes) -> Iterator[FileServer]:
    with FileServer() as files:
        files.routes.update(
            {
                "/ink.safetensors": (200, {}, lora_bytes, "ok"),
                "/chunked/ink.safetensors": (200, {}, lora_bytes, "chunked"),
                "/lie/ink.safetensors": (200, {}, lora_bytes, "lie"),
                "/drop/ink.safetensors": (200, {}, lora_bytes, "drop"),
                "/error/ink.safetensors": (500, {}, b"internal error", "ok"),
                "/model.safetensors": (200, {}, checkpoint_bytes, "ok"),
                "/api/download/7": (
                    200,
                    {"Content-Disposition": "attachment; filename*=UTF-8''ink%20style.safetensors"},
                    lora_bytes,
                    "ok",
                ),
                "/api/download/8": (200, {}, lora_bytes, "ok"),
                "/evil": (
                    200,
                    {"Content-Disposition": 'attachment; filename="../../x.safetensors"'},
                    lora_bytes,
                    "ok",
                ),  # fmt: skip
                "/move": (302, {"Location": "/ink.safetensors"}, b"", "ok"),
            }
        )
        yield files


def fetch(server: FileServer, path: str, folder: Path, **options: Any) -> Any:
    options.setdefault("max_bytes", MB * 50)
    return download_url(server.url(path), "lora", folder, allow_http=True, timeout=5, **options)


def test_download_with_progress(server: FileServer, tmp_path: Path, lora_bytes: bytes) -> None:
    seen: list[tuple[int, int | None]] = []
    placed = fetch(server, "/ink.safetensors", tmp_path / "loras",
                   progress=lambda done, total: seen.append((done, total)),
                   expected_sha256=sha(lora_bytes))  # fmt: skip
    assert placed.path.read_bytes() == lora_bytes and placed.filename == "ink.safetensors"
    assert seen and seen[-1] == (len(lora_bytes), len(lora_bytes))
    assert listing(tmp_path / "loras") == ["ink.safetensors"]


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/chunked/ink.safetensors", "ink.safetensors"),
        ("/api/download/7", "ink style.safetensors"),
        ("/evil", "x.safetensors"),
        ("/move", "ink.safetensors"),
    ],
)
def test_download_names_and_redirects(
    server: FileServer, tmp_path: Path, lora_bytes: bytes, path: str, name: str
) -> None:
    placed = fetch(server, path, tmp_path)
    assert placed.filename == name and placed.path.read_bytes() == lora_bytes
    assert listing(tmp_path) == [name]


@pytest.mark.parametrize(
    ("path", "error", "reason"),
    [
        ("/lie/ink.safetensors", UnusableFileError, "ink.safetensors: the download failed .*"
         "RemoteProtocolError.*nothing was kept"),
        ("/drop/ink.safetensors", UnusableFileError, "ink.safetensors: the download failed"),
        ("/error/ink.safetensors", UnusableFileError, "answered HTTP 500; nothing was kept"),
        ("/missing.safetensors", NotFoundError, "the server has no such file .HTTP 404"),
        ("/model.safetensors", UnusableFileError, "model.safetensors: not a LoRA"),
        ("/api/download/8", InvalidRequestError, "names no .safetensors file; give a file name"),
    ],
)  # fmt: skip
def test_failed_downloads_leave_nothing(
    server: FileServer, tmp_path: Path, path: str, error: type[Exception], reason: str
) -> None:
    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / "keep.safetensors").write_bytes(b"mine")
    with pytest.raises(error, match=reason):
        fetch(server, path, folder)
    assert listing(folder) == ["keep.safetensors"]


def test_download_size_limit_is_enforced_while_streaming(
    server: FileServer, tmp_path: Path, lora_bytes: bytes
) -> None:
    limit = len(lora_bytes) // 2
    with pytest.raises(UnusableFileError, match=r"ink.safetensors: [\d.]+ MB, over the"):
        fetch(server, "/ink.safetensors", tmp_path, max_bytes=limit)  # told by Content-Length
    with pytest.raises(UnusableFileError, match=r"ink.safetensors: over the"):
        fetch(server, "/chunked/ink.safetensors", tmp_path, max_bytes=limit)  # counted
    assert listing(tmp_path) == []


def test_download_refuses_sha_mismatch_and_existing_names(
    server: FileServer, tmp_path: Path, lora_bytes: bytes
) -> None:
    with pytest.raises(UnusableFileError, match="sha256 is"):
        fetch(server, "/ink.safetensors", tmp_path, expected_sha256="f" * 64)
    assert listing(tmp_path) == []
    fetch(server, "/ink.safetensors", tmp_path)
    with pytest.raises(InvalidRequestError, match="already in"):
        fetch(server, "/chunked/ink.safetensors", tmp_path)
    assert fetch(server, "/ink.safetensors", tmp_path, overwrite=True).replaced
    with pytest.raises(InvalidRequestError, match="not a path"):
        fetch(server, "/ink.safetensors", tmp_path, filename="../ink.safetensors")
    assert listing(tmp_path) == ["ink.safetensors"]


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:9/ink.safetensors", "only https:// links"),
        ("https://127.0.0.1:9/ink.safetensors", "local or private address"),
        ("https://10.1.2.3/ink.safetensors", "local or private address"),
        ("https://[::1]/ink.safetensors", "local or private address"),
        ("https://localhost/ink.safetensors", "local or private address"),
        ("org/repo", "not an http"),
    ],
)
def test_only_public_https_without_allow_http(tmp_path: Path, url: str, reason: str) -> None:
    with pytest.raises(InvalidRequestError, match=reason):
        download_url(url, "lora", tmp_path, max_bytes=MB)
    assert listing(tmp_path) == []


def test_redirect_to_http_is_refused(server: FileServer, tmp_path: Path) -> None:
    """An https link that redirects to http:// (here: a transport that answers every https
    request with a redirect to the local server) is refused at the redirect."""
    import httpx

    def redirect(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"Location": server.url("/ink.safetensors")})

    with pytest.raises(InvalidRequestError, match="only https:// links are allowed, not http"):
        download_url("https://8.8.8.8/ink.safetensors", "lora", tmp_path, max_bytes=MB,
                     transport=httpx.MockTransport(redirect))  # fmt: skip
    assert listing(tmp_path) == []


# ---------------------------------------------------------------------------- Hub


HUB_CLIENT = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from pipelines.errors import LorastackError
    from deployments.ingest import download_hub

    folder = Path(sys.argv[1])
    for reference, kind in json.loads(sys.argv[2]):
        seen = []
        result = {"reference": reference}
        try:
            placed = download_hub(reference, kind, folder, max_bytes=50 << 20,
                                  progress=lambda done, total: seen.append([done, total]))
            result.update(filename=placed.filename, sha256=placed.sha256,
                          architecture=placed.architecture, progress=seen[-1:])
        except LorastackError as error:
            result["error"] = f"{type(error).__name__}: {error.message}"
        result["folder"] = sorted(os.listdir(folder)) if folder.exists() else []
        print("RESULT " + json.dumps(result), flush=True)
""")


@pytest.fixture(scope="module")
def hub_results(
    tmp_path_factory: pytest.TempPathFactory,
    lora_bytes: bytes,
    other_lora_bytes: bytes,
    checkpoint_bytes: bytes,
) -> dict[str, dict[str, Any]]:
    root = tmp_path_factory.mktemp("hub")
    (root / "lora").mkdir()
    (root / "lora" / "ink.safetensors").write_bytes(lora_bytes)
    (root / "lora" / "README.md").write_text("# ink\n")
    (root / "many" / "sub").mkdir(parents=True)
    (root / "many" / "a.safetensors").write_bytes(lora_bytes)
    (root / "many" / "sub" / "b.safetensors").write_bytes(other_lora_bytes)
    (root / "ckpt").mkdir()
    (root / "ckpt" / "model.safetensors").write_bytes(checkpoint_bytes)
    steps = [
        ("org/lora", "lora"),
        ("org/lora/ink.safetensors@main", "lora"),
        ("org/many", "lora"),
        ("org/many/sub/b.safetensors", "lora"),
        ("org/ckpt", "lora"),
        ("org/nope", "lora"),
        ("org/lora/missing.safetensors", "lora"),
        ("https://example.com/x.safetensors", "lora"),
    ]
    data = root / "data"
    with FakeHub() as hub:
        for name in ("lora", "many", "ckpt"):
            hub.add_repo(f"org/{name}", root / name)
        environment = {
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(PROJECT_DIR),
            "HOME": str(data),
            "HF_HOME": str(data / "hf-home"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_ETAG_TIMEOUT": "3",
            "HF_HUB_DOWNLOAD_TIMEOUT": "5",
            "NO_PROXY": "127.0.0.1,localhost",
            "HF_ENDPOINT": hub.url,
            "HF_HUB_OFFLINE": "0",
        }
        done = subprocess.run(
            [sys.executable, "-c", HUB_CLIENT, str(data / "loras"), json.dumps(steps)],
            env=environment,
            cwd=PROJECT_DIR,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [
        json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RESULT ")
    ]
    assert len(lines) == len(steps), done.stdout + done.stderr[-4000:]
    results = {line["reference"]: line for line in lines}
    results["_hf_home"] = {"files": [str(p) for p in (data / "hf-home").rglob("*.safetensors")]}
    return results


def test_hub_download_places_the_only_file(
    hub_results: dict[str, dict[str, Any]], lora_bytes: bytes
) -> None:
    result = hub_results["org/lora"]
    assert "error" not in result, result
    assert result["filename"] == "ink.safetensors" and result["sha256"] == sha(lora_bytes)
    assert result["progress"] == [[len(lora_bytes), len(lora_bytes)]]
    assert result["folder"] == ["ink.safetensors"]
    assert hub_results["_hf_home"]["files"] == []  # no second copy in the HF cache


def test_hub_download_named_file_and_revision(hub_results: dict[str, dict[str, Any]]) -> None:
    again = hub_results["org/lora/ink.safetensors@main"]
    assert again["error"].startswith("InvalidRequestError: ink.safetensors: a file of that name")
    picked = hub_results["org/many/sub/b.safetensors"]
    assert picked["filename"] == "b.safetensors", picked
    assert picked["folder"] == ["b.safetensors", "ink.safetensors"]


@pytest.mark.parametrize(
    ("reference", "error"),
    [
        ("org/many", "InvalidRequestError: org/many: the repo holds 2 .safetensors files "
         "(a.safetensors, sub/b.safetensors); name one"),
        ("org/ckpt", "UnusableFileError: model.safetensors: not a LoRA"),
        ("org/nope", "NotFoundError: org/nope: not found on the Hub at http://127.0.0.1:"),
        ("org/lora/missing.safetensors", "NotFoundError: org/lora/missing.safetensors: org/lora "
         "has no file missing.safetensors (its .safetensors files: ink.safetensors)"),
        ("https://example.com/x.safetensors", "InvalidRequestError: 'https://example.com/x."
         "safetensors' is not a Hub reference"),
    ],
)  # fmt: skip
def test_hub_refusals_leave_nothing(
    hub_results: dict[str, dict[str, Any]], reference: str, error: str
) -> None:
    result = hub_results[reference]
    assert result["error"].startswith(error), result
    assert not any(name.startswith(".") for name in result["folder"])


def test_hub_offline_gives_a_clear_message(tmp_path: Path) -> None:
    """This process runs with HF_HUB_OFFLINE=1 (conftest)."""
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE, "conftest sets HF_HUB_OFFLINE=1 before any Hub import"
    with pytest.raises(UnusableFileError, match="org/lora: this server runs offline"):
        download_hub("org/lora", "lora", tmp_path, max_bytes=MB)
    assert listing(tmp_path) == []
