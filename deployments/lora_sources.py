"""Adding LoRAs from where people find them (a Hub repo, a Civitai page), and "Fetch info"
for LoRAs already on disk: the one implementation the page and the API call.

- Add: the file goes through the ingest rules (`deployments.ingest`: admin switches,
  size, header checked as a LoRA, atomic, never replacing unless asked), then its card is
  written (`deployments.loracards`): trigger words, base model, description, preview.
- Fetch info: the listed file's SHA256 is looked up with Civitai's
  `/api/v1/model-versions/by-hash/{hash}`; the Hub has no lookup by hash, so a Hub card is
  read only when the file's metadata names its repo.

Nothing is contacted unless the user asks for one of these actions. A user's Hub token or
Civitai key lives in `Credentials` for that one call: it is never stored, logged, written
into a sidecar or a message, and a request without one never borrows the server's own
(`HF_TOKEN` or a login are not used for these actions).
"""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from deployments.civitai import (
    CIVITAI,
    CivitaiClient,
    file_sha256,
    is_civitai_url,
    model_page,
    parse_civitai_url,
    preview_url,
    primary_file,
    trained_words,
)
from deployments.ingest import (
    DOWNLOAD_TIMEOUT,
    HubReference,
    IngestPolicy,
    PlacedFile,
    ProgressCallback,
    download_hub,
    download_url,
    parse_reference,
)
from deployments.loracards import CardInfo, has_preview, write_card
from pipelines.errors import InvalidRequestError, LorastackError, NotFoundError
from pipelines.folders.hashing import sha256_of_file
from pipelines.interface import GenerationService

if TYPE_CHECKING:
    import httpx

    from pipelines.folders.loras import LoraEntry
    from pipelines.settings import Settings

log = logging.getLogger(__name__)

HF_HOSTS = ("huggingface.co", "hf.co")
REPO_METADATA_KEYS = ("ss_huggingface_repo_id", "huggingface_repo_id")
"""safetensors metadata keys read as the LoRA's Hub repo (for "Fetch info"). No trainer
writes a standard key; these follow kohya's `--huggingface_repo_id` argument's name."""
_HF_FILE = re.compile(
    r"/(?P<repo>[^/]+/[^/]+)(?:/(?:blob|resolve|tree)/(?P<rev>[^/]+)(?:/(?P<path>.+))?)?/?"
)


@dataclass(frozen=True)
class Credentials:
    """A user's own secrets for one action (never stored; left out of every repr)."""

    hf_token: str | None = field(default=None, repr=False)
    civitai_api_key: str | None = field(default=None, repr=False)

    @classmethod
    def of(cls, hf_token: str | None, civitai_api_key: str | None) -> Credentials:
        """Blank strings count as none."""
        return cls((hf_token or "").strip() or None, (civitai_api_key or "").strip() or None)


@dataclass(frozen=True)
class CardResult:
    """What an add or a fetch did: the file (when added), the card, the sidecars written."""

    name: str
    card: CardInfo | None
    sidecars: tuple[str, ...] = ()
    placed: PlacedFile | None = None
    notes: tuple[str, ...] = ()

    def summary(self) -> dict[str, Any]:
        """The JSON the API answers (no paths)."""
        card = self.card
        return {
            "name": self.name,
            "filename": self.placed.filename if self.placed else None,
            "sha256": self.placed.sha256 if self.placed else None,
            "architecture": self.placed.architecture if self.placed else None,
            "source": card.source if card else None,
            "page_url": card.page_url if card else None,
            "trigger_words": list(card.trigger_words) if card else [],
            "base_model": card.base_model if card else None,
            "sidecars": list(self.sidecars),
            "notes": list(self.notes),
        }


def hub_reference(text: str) -> HubReference | None:
    """A Hub reference from `org/repo[/file]` or a huggingface.co link; None otherwise."""
    value = text.strip()
    parts = urlsplit(value)
    if parts.scheme in ("http", "https"):
        if (parts.hostname or "").lower() not in HF_HOSTS:
            return None
        match = _HF_FILE.fullmatch(unquote(parts.path))
        if match is None:
            raise InvalidRequestError(f"{value!r}: not a Hub model link", field="source")
        path = match["path"]
        if path is not None and (
            not path.lower().endswith(".safetensors") or ".." in path.split("/")
        ):
            raise InvalidRequestError(
                f"{value!r}: only a .safetensors file of the repo can be added", field="source"
            )
        return HubReference(match["repo"], path, match["rev"])
    try:
        reference = parse_reference(value)
    except InvalidRequestError:
        return None
    return reference if isinstance(reference, HubReference) else None


def hub_card(repo_id: str, revision: str | None, token: str | bool) -> tuple[CardInfo, str | None]:
    """The repo's model card as a CardInfo, and its first widget image (a repo path or a
    link), from the card's YAML: `instance_prompt` (else the first widget's `text`) as the
    trigger words, `base_model`, the widget's `output.url` as the preview."""
    from huggingface_hub import HfApi, constants

    info = HfApi().model_info(
        repo_id, revision=revision, token=token, timeout=constants.HF_HUB_ETAG_TIMEOUT
    )
    data = info.card_data.to_dict() if info.card_data is not None else {}
    widgets = [w for w in data.get("widget") or [] if isinstance(w, dict)]
    prompt = data.get("instance_prompt")
    words: tuple[str, ...]
    if isinstance(prompt, list):
        words = tuple(str(p).strip() for p in prompt if str(p).strip())
    elif isinstance(prompt, str) and prompt.strip():
        words = (prompt.strip(),)
    else:
        text = widgets[0].get("text") if widgets else None
        words = (text.strip(),) if isinstance(text, str) and text.strip() else ()
    base = data.get("base_model")
    image = next(
        (
            w["output"]["url"]
            for w in widgets
            if isinstance(w.get("output"), dict) and isinstance(w["output"].get("url"), str)
        ),
        None,
    )
    card = CardInfo(
        source="Hub",
        page_url=f"{constants.ENDPOINT}/{repo_id}",
        trigger_words=words,
        base_model=base[0] if isinstance(base, list) and base else base or None,
    )
    return card, image


class LoraSources:
    """Add LoRAs from the Hub or Civitai and fetch the cards of listed ones; one per server,
    holding no user state.

    Example:
        >>> sources = LoraSources.from_settings(service, settings)  # doctest: +SKIP
        >>> sources.add("https://civitai.com/models/12", Credentials()).summary()  # doctest: +SKIP
    """

    def __init__(
        self,
        service: GenerationService,
        policy: IngestPolicy,
        *,
        civitai_endpoint: str = CIVITAI,
        timeout: float = DOWNLOAD_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.service = service
        self.policy = policy
        self.civitai_endpoint = civitai_endpoint.rstrip("/")
        self.timeout = timeout  # seconds any one network wait may take
        self.transport = transport

    @classmethod
    def from_settings(cls, service: GenerationService, settings: Settings) -> LoraSources:
        return cls(
            service,
            IngestPolicy.from_settings(settings),
            civitai_endpoint=settings.civitai_endpoint,
        )

    def _civitai(self, credentials: Credentials) -> CivitaiClient:
        return CivitaiClient(
            self.civitai_endpoint,
            api_key=credentials.civitai_api_key,
            allow_http=self.policy.allow_http,
            timeout=self.timeout,
            transport=self.transport,
        )

    # ------------------------------------------------------------------ add

    def add(
        self,
        source: str,
        credentials: Credentials,
        *,
        filename: str | None = None,
        overwrite: bool = False,
        progress: ProgressCallback | None = None,
    ) -> CardResult:
        """Download a LoRA named by a Civitai link, a Hub link or `org/repo[/file]`, write
        its card, rescan. Raises the ingest errors (naming the field and the file)."""
        text = (source or "").strip()
        if not text:
            raise InvalidRequestError(
                "source is empty: give a Civitai link or a Hub repo id or link", field="source"
            )
        self.policy.check("download", "lora")
        if is_civitai_url(text, self.civitai_endpoint):
            result = self._add_civitai(text, credentials, filename, overwrite, progress)
        else:
            reference = hub_reference(text)
            if reference is None:
                raise InvalidRequestError(
                    f"{text!r} is neither a Civitai link nor a Hub repo id or link (plain "
                    "links are downloaded in the Add files tab, without a card)",
                    field="source",
                )
            if filename is not None:
                raise InvalidRequestError(
                    "filename: a Hub file keeps its name in the repo", field="filename"
                )
            result = self._add_hub(reference, credentials, overwrite, progress)
        self.service.rescan()
        return result

    def _add_civitai(
        self,
        text: str,
        credentials: Credentials,
        filename: str | None,
        overwrite: bool,
        progress: ProgressCallback | None,
    ) -> CardResult:
        target = parse_civitai_url(text)
        with self._civitai(credentials) as civitai:
            version = civitai.resolve(target)
            file = primary_file(version)
            placed = download_url(
                file["downloadUrl"],
                "lora",
                self.policy.lora_folder,
                max_bytes=self.policy.max_bytes,
                expected_sha256=file_sha256(file),
                filename=filename or _offered_name(file.get("name")),
                overwrite=overwrite,
                progress=progress,
                allow_http=self.policy.allow_http,
                timeout=self.timeout,
                transport=self.transport,
                headers=civitai.auth_headers,
            )
            card = self._civitai_card(version)
            notes: list[str] = []
            image = self._civitai_image(civitai, version, placed.path, notes)
        families = tuple(placed.architecture.split("/"))
        written = write_card(placed.path, card, families, image)
        return CardResult(placed.path.stem, card, tuple(written), placed, (*placed.notes, *notes))

    def _civitai_card(self, version: dict[str, Any]) -> CardInfo:
        model = version.get("model") if isinstance(version.get("model"), dict) else {}
        description = version.get("description") or (model or {}).get("description") or ""
        return CardInfo(
            source="Civitai",
            page_url=model_page(self.civitai_endpoint, version),
            trigger_words=trained_words(version),
            base_model=str(version.get("baseModel") or "") or None,
            description=str(description),
            civitai_info=version,
        )

    @staticmethod
    def _civitai_image(
        civitai: CivitaiClient, version: dict[str, Any], weights: Path, notes: list[str]
    ) -> bytes | None:
        """The version's first image, unless the LoRA has a preview; a failure is a note."""
        url = preview_url(version)
        if url is None or has_preview(weights):
            return None
        try:
            return civitai.image(url)
        except LorastackError as error:
            notes.append(f"no preview: {error.message}")
            return None

    def _add_hub(
        self,
        reference: HubReference,
        credentials: Credentials,
        overwrite: bool,
        progress: ProgressCallback | None,
    ) -> CardResult:
        token: str | bool = credentials.hf_token or False
        placed = download_hub(
            reference,
            "lora",
            self.policy.lora_folder,
            max_bytes=self.policy.max_bytes,
            overwrite=overwrite,
            progress=progress,
            token=token,
        )
        notes = list(placed.notes)
        card, written = self._hub_card_for(
            reference, token, placed.path, placed.architecture, notes
        )
        return CardResult(placed.path.stem, card, written, placed, tuple(notes))

    def _hub_card_for(
        self,
        reference: HubReference,
        token: str | bool,
        weights: Path,
        architecture: str | None,
        notes: list[str],
    ) -> tuple[CardInfo | None, tuple[str, ...]]:
        """Read the repo's card and write the sidecars; a card that cannot be read is a note
        (the file itself is fine)."""
        try:
            card, image_ref = hub_card(reference.repo_id, reference.revision, token)
        except Exception as error:  # huggingface_hub and its HTTP client raise many types
            notes.append(f"the model card could not be read ({type(error).__name__})")
            return None, ()
        image = None
        if image_ref and not has_preview(weights):
            try:
                image = self._hub_image(reference, image_ref, token, notes)
            except Exception as error:  # as above: the card stands without its image
                notes.append(f"no preview: the card's image {image_ref!r} ({type(error).__name__})")
        families = tuple(architecture.split("/")) if architecture else ()
        return card, tuple(write_card(weights, card, families, image))

    def _hub_image(
        self, reference: HubReference, image_ref: str, token: str | bool, notes: list[str]
    ) -> bytes | None:
        """The widget image: a file of the repo, or a link (fetched under the link rules)."""
        from huggingface_hub import hf_hub_download

        if urlsplit(image_ref).scheme in ("http", "https"):
            with self._civitai(Credentials()) as client:  # no key: a plain image fetch
                try:
                    return client.image(image_ref)
                except LorastackError as error:
                    notes.append(f"no preview: {error.message}")
                    return None
        path = PurePosixPath(image_ref.lstrip("/"))
        if ".." in path.parts:
            notes.append(f"no preview: the card's image path {image_ref!r} leaves the repo")
            return None
        with tempfile.TemporaryDirectory(prefix=".incoming-", dir=self.policy.lora_folder) as tmp:
            fetched = hf_hub_download(
                reference.repo_id,
                path.as_posix(),
                revision=reference.revision,
                local_dir=tmp,
                token=token,
            )
            return Path(fetched).read_bytes()

    # ------------------------------------------------------------------ fetch info

    def fetch_info(self, name: str, credentials: Credentials) -> CardResult:
        """Fill the card of a listed LoRA: Civitai by the file's SHA256, else the Hub repo
        its metadata names. Raises NotFoundError when neither knows the file."""
        self.policy.check("download", "lora")
        entry: LoraEntry = self.service.resolve_lora(name)
        if entry.path.is_dir():
            raise InvalidRequestError(
                f"{entry.name}: a PEFT folder has no single file to look up by hash", field="name"
            )
        digest = entry.sha256 or sha256_of_file(entry.path)
        notes: list[str] = []
        card: CardInfo | None = None
        written: tuple[str, ...] = ()
        try:
            with self._civitai(credentials) as civitai:
                version = civitai.by_hash(digest)
                card = self._civitai_card(version)
                image = self._civitai_image(civitai, version, entry.path, notes)
            written = tuple(write_card(entry.path, card, entry.families, image))
        except NotFoundError:
            repo = next(
                (entry.metadata[k] for k in REPO_METADATA_KEYS if entry.metadata.get(k)), None
            )
            if repo is None:
                raise NotFoundError(
                    f"{entry.name}: Civitai knows no file with sha256 {digest[:12]}…, and the "
                    "file's metadata names no Hub repo",
                    field="name",
                ) from None
            notes.append(
                f"Civitai knows no file with sha256 {digest[:12]}…; read the Hub card of {repo}"
            )
            reference = hub_reference(repo)
            if reference is None:
                raise NotFoundError(
                    f"{entry.name}: its metadata names {repo!r}, which is no Hub repo id",
                    field="name",
                ) from None
            token: str | bool = credentials.hf_token or False
            card, written = self._hub_card_for(
                reference, token, entry.path, entry.architecture, notes
            )
        self.service.rescan()
        return CardResult(entry.name, card, written, None, tuple(notes))


def _offered_name(name: object) -> str | None:
    """A server-given file name, reduced to its last part (a name is never a path)."""
    if not isinstance(name, str) or not name.strip():
        return None
    return PurePosixPath(name.replace("\\", "/")).name or None
