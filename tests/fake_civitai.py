"""A local stand-in for Civitai's public API (v1), on 127.0.0.1: model and model-version
records, the lookup by file hash, downloads, and an image "CDN" on a second port (another
origin, as image.civitai.com is), so tests can see which host received the API key.

Records have the real API's shape (the fields lorastack reads, and a few it does not).
A version may require a key (`needs_key`: 401 without `Authorization: Bearer <key>`), send
a truncated body (`how="lie"`: Content-Length larger than the body) or a slow one
(`how="slow"`: a pause longer than the client's read timeout before the body).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from tests.local_servers import ApiAndCdn


@dataclass
class FakeFile:
    """One version's model file and how the server sends it."""

    name: str
    data: bytes
    how: str = "ok"  # "ok", "lie" (truncated), "slow"


@dataclass
class FakeCivitai(ApiAndCdn):
    """The servers and their state. Use as a context manager; `url` is the endpoint."""

    versions: dict[int, dict[str, Any]] = field(default_factory=dict)
    models: dict[int, dict[str, Any]] = field(default_factory=dict)
    files: dict[int, FakeFile] = field(default_factory=dict)  # version id -> file
    images: dict[str, bytes] = field(default_factory=dict)  # name -> bytes, on the CDN
    needs_key: dict[int, str] = field(default_factory=dict)  # version id -> the key it wants
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    slow_seconds: float = 3.0

    def __post_init__(self) -> None:
        self.open_servers(type("Handler", (_Handler,), {"civitai": self}), _QuietServer)
        self._lock = threading.Lock()

    def add_version(
        self,
        version_id: int,
        model_id: int,
        file: FakeFile,
        *,
        trained_words: list[str] | None = None,
        base_model: str = "SD 1.5",
        image: bytes | None = None,
        description: str = "",
        key: str | None = None,
    ) -> dict[str, Any]:
        """Register a version (and its model); returns the version record."""
        images = []
        if image is not None:
            name = f"v{version_id}.jpeg"
            self.images[name] = image
            images = [
                {"url": f"{self.cdn_url}/videos/v{version_id}.mp4", "type": "video"},
                {"url": f"{self.cdn_url}/images/{name}", "type": "image", "nsfwLevel": 1},
            ]
        sha = hashlib.sha256(file.data).hexdigest().upper()
        record = {
            "id": version_id,
            "modelId": model_id,
            "name": f"v{version_id}",
            "baseModel": base_model,
            "trainedWords": trained_words or [],
            "description": description,
            "model": {"name": f"model {model_id}", "type": "LORA", "nsfw": False},
            "files": [
                {"id": version_id * 10 + 1, "name": "training.zip", "type": "Training Data",
                 "downloadUrl": f"{self.url}/api/download/training/{version_id}"},
                {"id": version_id * 10, "name": file.name, "type": "Model", "primary": True,
                 "sizeKB": len(file.data) / 1024, "hashes": {"SHA256": sha, "AutoV2": sha[:10]},
                 "downloadUrl": f"{self.url}/api/download/models/{version_id}"},
            ],
            "images": images,
            "downloadUrl": f"{self.url}/api/download/models/{version_id}",
        }  # fmt: skip
        self.versions[version_id] = record
        self.files[version_id] = file
        if key is not None:
            self.needs_key[version_id] = key
        model = self.models.setdefault(
            model_id, {"id": model_id, "name": f"model {model_id}", "type": "LORA"}
        )
        brief = {k: v for k, v in record.items() if k not in ("model", "modelId")}
        model["modelVersions"] = [brief, *model.get("modelVersions", [])]  # newest first
        return record

    def log(self, method: str, path: str, headers: dict[str, str]) -> None:
        with self._lock:
            self.requests.append((method, path, headers))


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        """A client that gives up (a timeout test) is expected here."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    civitai: FakeCivitai

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the server keeps its own request log."""

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        self.civitai.log("GET", self.path, dict(self.headers.items()))
        parts = path.strip("/").split("/")
        if parts[:4] == ["api", "v1", "model-versions", "by-hash"] and len(parts) == 5:
            wanted = parts[4].lower()
            found = [
                v
                for v in self.civitai.versions.values()
                for f in v["files"]
                if f.get("hashes", {}).get("SHA256", "").lower() == wanted
            ]
            self._json(found[0] if found else None)
        elif parts[:3] == ["api", "v1", "model-versions"] and len(parts) == 4:
            self._json(self.civitai.versions.get(int(parts[3])) if parts[3].isdigit() else None)
        elif parts[:3] == ["api", "v1", "models"] and len(parts) == 4:
            self._json(self.civitai.models.get(int(parts[3])) if parts[3].isdigit() else None)
        elif parts[:3] == ["api", "download", "models"] and len(parts) == 4:
            self._download(int(parts[3]))
        elif parts[0] == "images" and len(parts) == 2 and parts[1] in self.civitai.images:
            data = self.civitai.images[parts[1]]
            self._send(200, {"Content-Type": "image/jpeg"}, data)
        else:
            self._json(None)

    def _download(self, version_id: int) -> None:
        file = self.civitai.files.get(version_id)
        if file is None:
            self._json(None)
            return
        key = self.civitai.needs_key.get(version_id)
        if key is not None and self.headers.get("Authorization") != f"Bearer {key}":
            self._send(401, {"Content-Type": "application/json"}, b'{"error":"Unauthorized"}')
            return
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'attachment; filename="{file.name}"',
        }
        if file.how == "lie":
            headers["Content-Length"] = str(len(file.data) + 1000)
            self._send(200, headers, file.data, length=False)
            return
        if file.how == "slow":
            self.send_response(200)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(file.data)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(file.data[:100])
            self.wfile.flush()
            time.sleep(self.civitai.slow_seconds)
            self.close_connection = True
            return
        self._send(200, headers, file.data)

    def _json(self, value: Any) -> None:
        if value is None:
            self._send(404, {"Content-Type": "application/json"}, b'{"error":"Not found"}')
            return
        self._send(200, {"Content-Type": "application/json"}, json.dumps(value).encode())

    def _send(self, status: int, headers: dict[str, str], data: bytes, length: bool = True) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if length:
            self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()
        self.close_connection = True
