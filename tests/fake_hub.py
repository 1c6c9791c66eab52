"""A local stand-in for the Hugging Face Hub: just enough HTTP for huggingface_hub's
`model_info`, `list_repo_files`/`list_repo_tree`, `snapshot_download` and `hf_hub_download`.

Each repo is a folder on disk. Like the real Hub, small files are served by
`/{repo}/resolve/{rev}/{path}` itself (ETag = git blob id), while `.safetensors` files
answer with a 302 to a separate "CDN" server on another port, carrying `X-Linked-Etag`
(sha256) and `X-Linked-Size`, so the client's LFS path is exercised too. `fail` makes the
GET of one file answer 500, to interrupt a download half-way. A repo's README.md YAML
header is served as the model info's `cardData` (instance_prompt, widget, base_model)
unless `cards` holds the repo's card data.

For resumable downloads the file server honours `Range: bytes=N-` (206; each start is
recorded in `ranges`); `cut` sends a file's first N bytes and drops the connection, after
which that file answers 500 until `down` is cleared (a process stopped mid-download);
`corrupt` serves a file with one byte changed under its true size and sha256. `GET
/_step/NAME` only logs a marker and runs `on_step[NAME]`, so one client process can run
several scenarios in turn and a test can tell which requests each made. `cards` holds a
repo's model-card metadata (`cardData`, e.g. the licence); `model_info` lists each file's
size and, for LFS files, sha256, as the Hub does with `blobs=true`.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tests.local_servers import ApiAndCdn

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # every repo has this one revision
LFS_SUFFIXES = (".safetensors",)


def git_blob_id(data: bytes) -> str:
    """The git object id of a file's contents (the Hub's ETag for small files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeHub(ApiAndCdn):
    """The servers and their state. Use as a context manager; `url` is the HF_ENDPOINT."""

    repos: dict[str, Path] = field(default_factory=dict)
    fail: dict[tuple[str, str], int] = field(default_factory=dict)  # (repo, path) -> 500s left
    requests: list[str] = field(default_factory=list)  # "METHOD /path", in arrival order
    cut: dict[tuple[str, str], int] = field(default_factory=dict)  # (repo, path) -> bytes sent
    down: set[tuple[str, str]] = field(default_factory=set)  # files answering 500 (after a cut)
    corrupt: set[tuple[str, str]] = field(default_factory=set)  # served with one byte changed
    ranges: list[tuple[str, int]] = field(default_factory=list)  # (path, first byte) per Range GET
    cards: dict[str, dict[str, object]] = field(default_factory=dict)  # repo -> cardData
    on_step: dict[str, Callable[[], None]] = field(default_factory=dict)  # marker -> set-up
    # (repo, path) -> (bytes sent at once, event): the rest follows when the event is set
    hold: dict[tuple[str, str], tuple[int, threading.Event]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.open_servers(type("Handler", (_Handler,), {"hub": self}))
        self._lock = threading.Lock()

    def add_repo(self, repo_id: str, folder: Path) -> None:
        self.repos[repo_id] = folder

    def log(self, line: str) -> None:
        with self._lock:
            self.requests.append(line)

    def take_cut(self, repo_id: str, name: str) -> int | None:
        """Bytes to send before dropping this GET of `name` (then the file is down), if any."""
        with self._lock:
            sent = self.cut.pop((repo_id, name), None)
            if sent is not None:
                self.down.add((repo_id, name))
            return sent

    def steps(self) -> dict[str, list[str]]:
        """The request log split at `/_step/NAME` markers: NAME -> the requests after it."""
        split: dict[str, list[str]] = {}
        current: list[str] = split.setdefault("", [])
        for line in self.requests:
            if line.startswith("GET /_step/"):
                current = split.setdefault(line.removeprefix("GET /_step/"), [])
            else:
                current.append(line)
        return split

    def take_failure(self, repo_id: str, name: str) -> bool:
        """Whether this GET of `name` is to fail (counting it down)."""
        with self._lock:
            left = self.fail.get((repo_id, name), 0)
            if left:
                self.fail[(repo_id, name)] = left - 1
            return left > 0

    def files(self, repo_id: str) -> list[str]:
        """The repo's files, relative, sorted (hidden names skipped)."""
        root = self.repos[repo_id]
        paths = (p.relative_to(root) for p in root.rglob("*") if p.is_file())
        return sorted(p.as_posix() for p in paths if not any(s.startswith(".") for s in p.parts))


def card_data(readme: Path) -> dict[str, object] | None:
    """The YAML header of a repo's README.md (the Hub's `cardData`), if it has one."""
    import yaml

    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    if not text.startswith("---\n") or "\n---" not in text[4:]:
        return None
    data = yaml.safe_load(text[4 : text.index("\n---", 4)])
    return data if isinstance(data, dict) else None


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the hub keeps its own request log."""

    def do_HEAD(self) -> None:
        self._route(body=False)

    def do_GET(self) -> None:
        self._route(body=True)

    # ------------------------------------------------------------------ routing

    def _route(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self.hub.log(f"{self.command} {path}")
        parts = path.strip("/").split("/")
        if parts[0] == "_step" and len(parts) == 2:
            setup = self.hub.on_step.get(parts[1])
            if setup is not None:
                setup()
            self._json({"step": parts[1]})
        elif parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id, rest = "/".join(parts[2:4]), parts[4:]
            if not rest or rest[0] == "revision":
                self._model_info(repo_id)
            elif rest[0] == "tree":
                self._tree(repo_id, "/".join(rest[2:]))
            else:
                self._error(404, "EntryNotFound", f"no route for {path}")
        elif parts[0] == "cdn" and len(parts) >= 4:
            self._file("/".join(parts[1:3]), "/".join(parts[3:]), body, cdn=True)
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._file("/".join(parts[:2]), "/".join(parts[4:]), body, cdn=False)
        else:
            self._error(404, "EntryNotFound", f"no route for {path}")

    def _repo(self, repo_id: str) -> Path | None:
        folder = self.hub.repos.get(repo_id)
        if folder is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
        return folder

    def _model_info(self, repo_id: str) -> None:
        if self._repo(repo_id) is None:
            return
        folder = self.hub.repos[repo_id]
        siblings: list[dict[str, object]] = []
        for name in self.hub.files(repo_id):
            data = (folder / name).read_bytes()
            sibling: dict[str, object] = {"rfilename": name, "size": len(data)}
            sibling["blobId"] = git_blob_id(data)
            if name.endswith(LFS_SUFFIXES):
                sha = hashlib.sha256(data).hexdigest()
                sibling["lfs"] = {"sha256": sha, "size": len(data), "pointerSize": 134}
            siblings.append(sibling)
        info: dict[str, object] = {"id": repo_id, "sha": COMMIT, "private": False}
        card = self.hub.cards.get(repo_id) or card_data(folder / "README.md")
        if card:
            info["cardData"] = card
        self._json(info | {"siblings": siblings})

    def _tree(self, repo_id: str, prefix: str) -> None:
        folder = self._repo(repo_id)
        if folder is None:
            return
        entries: list[dict[str, object]] = []
        folders: set[str] = set()
        for name in self.hub.files(repo_id):
            if prefix and not name.startswith(prefix.rstrip("/") + "/"):
                continue
            data = (folder / name).read_bytes()
            entry: dict[str, object] = {
                "type": "file",
                "path": name,
                "size": len(data),
                "oid": git_blob_id(data),
            }
            if name.endswith(LFS_SUFFIXES):
                sha = hashlib.sha256(data).hexdigest()
                entry["lfs"] = {"oid": sha, "size": len(data), "pointerSize": 134}
            entries.append(entry)
            parents = name.split("/")[:-1]
            folders.update("/".join(parents[: i + 1]) for i in range(len(parents)))
        for name in sorted(folders):
            entries.append({"type": "directory", "path": name, "oid": git_blob_id(name.encode())})
        self._json(entries)

    def _file(self, repo_id: str, name: str, body: bool, *, cdn: bool) -> None:
        folder = self._repo(repo_id)
        if folder is None:
            return
        if name not in self.hub.files(repo_id):
            self._error(404, "EntryNotFound", f"{name} not found in {repo_id}")
            return
        data = (folder / name).read_bytes()
        if body and (self.hub.take_failure(repo_id, name) or (repo_id, name) in self.hub.down):
            self._error(500, None, f"injected failure for {name}")
            return
        lfs = name.endswith(LFS_SUFFIXES)
        headers = {"X-Repo-Commit": COMMIT}
        if lfs and not cdn:  # the Hub redirects LFS files to its CDN, off the Hub's host
            sha = hashlib.sha256(data).hexdigest()
            headers |= {
                "Location": f"{self.hub.cdn_url}/cdn/{repo_id}/{name}",
                "X-Linked-Etag": f'"{sha}"',
                "X-Linked-Size": str(len(data)),
                "Content-Length": "0",
            }
            self._send(302, headers, b"")
            return
        etag = hashlib.sha256(data).hexdigest() if lfs else git_blob_id(data)
        headers |= {"ETag": f'"{etag}"', "Content-Length": str(len(data))}
        if body and (repo_id, name) in self.hub.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        status, start = 200, _range_start(self.headers.get("Range"))
        if start is not None and body:
            self.hub.ranges.append((name, start))
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            headers["Content-Length"] = str(len(data) - start)
            status, data = 206, data[start:]
        sent = self.hub.take_cut(repo_id, name) if body else None
        if sent is not None:  # the connection drops mid-file
            self._send(status, headers, data[:sent])
            self.close_connection = True
            return
        held = self.hub.hold.get((repo_id, name)) if body else None
        if held is not None:  # part now, the rest once the test lets it go
            self._send(status, headers, data[: held[0]])
            self.wfile.flush()
            held[1].wait(timeout=120)
            self.wfile.write(data[held[0] :])
            return
        self._send(status, headers, data if body else b"")

    # ------------------------------------------------------------------ replies

    def _json(self, value: object) -> None:
        data = json.dumps(value).encode()
        headers = {"Content-Type": "application/json", "Content-Length": str(len(data))}
        self._send(200, headers, data if self.command == "GET" else b"")

    def _error(self, status: int, code: str | None, message: str) -> None:
        data = json.dumps({"error": message}).encode()
        headers = {"Content-Type": "application/json", "Content-Length": str(len(data))}
        if code:
            headers["X-Error-Code"] = code
            headers["X-Error-Message"] = message
        self._send(status, headers, data if self.command == "GET" else b"")

    def _send(self, status: int, headers: dict[str, str], data: bytes) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if data:
            self.wfile.write(data)


def _range_start(header: str | None) -> int | None:
    """The first byte of a `Range: bytes=N-` header (the only form downloads resume with)."""
    if not header or not header.startswith("bytes=") or not header.endswith("-"):
        return None
    return int(header[len("bytes=") : -1])
