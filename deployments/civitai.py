"""Civitai's public REST API (v1): a model version's metadata, the lookup by file hash, and
the links the metadata names (the primary file, preview images).

Only what the user asks for is requested, one client per action. The user's API key, when
given, goes only into the `Authorization` header of requests to the Civitai endpoint
itself: never into a URL, a message, a log line or a file, and never to another host
(preview images live on Civitai's image CDN, and httpx drops the header on a redirect to
another origin). The same address rules as any download apply: https to public hosts only,
unless the operator allows plain http (tests, an own mirror).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from deployments.ingest import DOWNLOAD_TIMEOUT, RequestRefused, guard_requests
from pipelines.errors import InvalidRequestError, NotFoundError, UnusableFileError

if TYPE_CHECKING:
    import httpx

CIVITAI = "https://civitai.com"
CIVITAI_HOSTS = ("civitai.com", "www.civitai.com", "civitai.green", "www.civitai.green")
"""Hosts whose links are read as Civitai links (their API calls go to the endpoint)."""
MAX_JSON_BYTES = 8 << 20
MAX_IMAGE_BYTES = 32 << 20
_MODEL_PAGE = re.compile(r"/models/(?P<model>\d+)(?:/[^/]*)?/?")
_DOWNLOAD = re.compile(r"/api/download/models/(?P<version>\d+)/?")
_VERSION_API = re.compile(r"/api/v1/model-versions/(?P<version>\d+)/?")
_VIDEO = (".mp4", ".webm", ".mov", ".gif")


@dataclass(frozen=True)
class CivitaiTarget:
    """What a Civitai link points at: a model (its newest version) or one version."""

    model_id: int | None = None
    version_id: int | None = None


def is_civitai_url(text: str, endpoint: str = CIVITAI) -> bool:
    """Whether `text` is a link to Civitai (or to the configured endpoint)."""
    parts = urlsplit(text.strip())
    host = (parts.hostname or "").lower()
    return parts.scheme in ("http", "https") and (
        host in CIVITAI_HOSTS or host == (urlsplit(endpoint).hostname or "").lower()
    )


def parse_civitai_url(text: str) -> CivitaiTarget:
    """The model or version a Civitai link names.

    Example:
        >>> parse_civitai_url("https://civitai.com/models/12/ink?modelVersionId=34")
        CivitaiTarget(model_id=12, version_id=34)
    """
    parts = urlsplit(text.strip())
    version = parse_qs(parts.query).get("modelVersionId", [""])[0]
    if match := _MODEL_PAGE.fullmatch(parts.path):
        return CivitaiTarget(int(match["model"]), int(version) if version.isdigit() else None)
    if match := _DOWNLOAD.fullmatch(parts.path) or _VERSION_API.fullmatch(parts.path):
        return CivitaiTarget(None, int(match["version"]))
    raise InvalidRequestError(
        f"{text.strip()!r}: not a Civitai model or version link (expected "
        "https://civitai.com/models/ID, .../models/ID?modelVersionId=ID or "
        ".../api/download/models/ID)",
        field="source",
    )


@dataclass
class CivitaiClient:
    """One action's requests to the Civitai API. Use as a context manager.

    Example:
        >>> with CivitaiClient() as civitai:  # doctest: +SKIP
        ...     version = civitai.by_hash("ab12...")
    """

    endpoint: str = CIVITAI
    api_key: str | None = field(default=None, repr=False)
    allow_http: bool = False
    timeout: float = DOWNLOAD_TIMEOUT
    transport: httpx.BaseTransport | None = None

    def __enter__(self) -> CivitaiClient:
        import httpx

        self.endpoint = self.endpoint.rstrip("/")
        self._client = httpx.Client(
            transport=self.transport,
            follow_redirects=True,
            timeout=httpx.Timeout(self.timeout),
            event_hooks={"request": [guard_requests(self.allow_http)]},
            trust_env=False,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.close()

    @property
    def auth_headers(self) -> dict[str, str]:
        """The key's header, for requests to the endpoint only."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _get(self, path: str, what: str, limit: int = MAX_JSON_BYTES) -> Any:
        """GET an API path's JSON; the errors name `what`, never the key."""
        data = self._fetch(f"{self.endpoint}{path}", what, self.auth_headers, limit)
        try:
            return json.loads(data)
        except ValueError:
            raise UnusableFileError(
                f"{what}: Civitai's answer is not JSON", field="source"
            ) from None

    def _fetch(self, url: str, what: str, headers: dict[str, str], limit: int) -> bytes:
        """The body of a GET, at most `limit` bytes; refusals as the ingest errors."""
        import httpx

        try:
            with self._client.stream("GET", url, headers=headers) as response:
                if response.status_code in (404, 410):
                    raise NotFoundError(f"{what}: Civitai has no such entry", field="source")
                if response.status_code in (401, 403):
                    raise UnusableFileError(
                        f"{what}: Civitai refused the request (HTTP {response.status_code}); "
                        "early-access and login-only models need your Civitai API key",
                        field="civitai_api_key",
                    )
                if response.status_code >= 400:
                    raise UnusableFileError(
                        f"{what}: Civitai answered HTTP {response.status_code}", field="source"
                    )
                data = bytearray()
                for chunk in response.iter_bytes():
                    data += chunk
                    if len(data) > limit:
                        raise UnusableFileError(
                            f"{what}: the answer is over {limit >> 20} MB", field="source"
                        )
            return bytes(data)
        except httpx.HTTPError as error:
            reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]
            raise UnusableFileError(
                f"{what}: {urlsplit(url).netloc} could not be reached or failed ({reason})",
                field="source",
            ) from None
        except RequestRefused as error:  # a link or redirect to a refused place
            raise UnusableFileError(f"{what}: {error}", field="source") from None

    def version(self, version_id: int) -> dict[str, Any]:
        """A model version's record (`/api/v1/model-versions/{id}`)."""
        return _record(self._get(f"/api/v1/model-versions/{version_id}", f"version {version_id}"))

    def by_hash(self, sha256: str) -> dict[str, Any]:
        """The version whose file has this SHA256 (`/model-versions/by-hash/{hash}`)."""
        what = f"a file with sha256 {sha256[:12]}…"
        return _record(self._get(f"/api/v1/model-versions/by-hash/{sha256.upper()}", what))

    def resolve(self, target: CivitaiTarget) -> dict[str, Any]:
        """The version a link names; a model's newest version when it names none."""
        if target.version_id is not None:
            return self.version(target.version_id)
        model = self._get(f"/api/v1/models/{target.model_id}", f"model {target.model_id}")
        versions = model.get("modelVersions") if isinstance(model, dict) else None
        if not versions or not isinstance(versions[0], dict) or "id" not in versions[0]:
            raise NotFoundError(f"model {target.model_id}: it has no versions", field="source")
        return self.version(int(versions[0]["id"]))

    def image(self, url: str) -> bytes:
        """A preview image's bytes (sent without the key: images live on another host)."""
        return self._fetch(url, "the preview image", {}, MAX_IMAGE_BYTES)


def _record(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict) or "id" not in data:
        raise UnusableFileError("Civitai's answer is not a model version record", field="source")
    return data


def primary_file(version: dict[str, Any]) -> dict[str, Any]:
    """The version's model file: the one marked primary, else the first `Model` file."""
    files = [f for f in version.get("files") or [] if isinstance(f, dict)]
    models = [f for f in files if f.get("type", "Model") == "Model"] or files
    chosen = next((f for f in models if f.get("primary")), models[0] if models else None)
    if chosen is None or not chosen.get("downloadUrl"):
        raise NotFoundError(f"version {version.get('id')}: it lists no file", field="source")
    return chosen


def file_sha256(file: dict[str, Any]) -> str | None:
    """The SHA256 Civitai lists for a file, lower-case, if any."""
    hashes = file.get("hashes") or {}
    value = hashes.get("SHA256") if isinstance(hashes, dict) else None
    return str(value).lower() if value else None


def preview_url(version: dict[str, Any]) -> str | None:
    """The first still image of the version's gallery."""
    for image in version.get("images") or []:
        if not isinstance(image, dict) or not isinstance(image.get("url"), str):
            continue
        url = image["url"]
        if image.get("type", "image") == "image" and not urlsplit(url).path.endswith(_VIDEO):
            return url
    return None


def trained_words(version: dict[str, Any]) -> tuple[str, ...]:
    """The version's trigger words, as Civitai lists them (blank ones dropped)."""
    words = version.get("trainedWords") or []
    return tuple(w.strip() for w in words if isinstance(w, str) and w.strip())


def model_page(endpoint: str, version: dict[str, Any]) -> str:
    """The version's page on Civitai."""
    model_id = version.get("modelId") or (version.get("model") or {}).get("id")
    return f"{endpoint.rstrip('/')}/models/{model_id}?modelVersionId={version['id']}"
