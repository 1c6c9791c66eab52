"""Adding LoRAs from Civitai and "Fetch info" by hash, against a local fake Civitai
(tests/fake_civitai.py); the sidecars written are read back by the registry.

The Hub side runs in a subprocess (huggingface_hub reads HF_ENDPOINT at import and this
process is offline): see test_hub_cards below.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save

from deployments.civitai import CivitaiTarget, parse_civitai_url
from deployments.ingest import IngestPolicy
from deployments.lora_sources import Credentials, LoraSources, hub_reference
from deployments.loracards import replace_preview, sd_version
from frontends.api.routes import build_api
from frontends.page.lora_sources_panel import (
    add_lora,
    chosen_image,
    fetch_info,
    make_preview,
    preview_refusal,
)
from pipelines.errors import (
    InvalidRequestError,
    LorastackError,
    NotFoundError,
    UnusableFileError,
)
from pipelines.loading import LoadedModel
from pipelines.service import Service, build_service
from pipelines.settings import PROJECT_DIR, parse_settings
from tests.fake_civitai import FakeCivitai, FakeFile
from tests.fake_hub import FakeHub
from tests.test_lora import SD1_MODULES, make_kohya, sd1_keys

KEY = "civitai-secret-key-0123456789"
TOKEN = "hf_secret_token_0123456789"
MB = 1 << 20


def lora(tiny_sd1: LoadedModel, seed: int, metadata: dict[str, str] | None = None) -> bytes:
    state = make_kohya(tiny_sd1.pipe, SD1_MODULES, sd1_keys(SD1_MODULES), seed=seed)
    return save({k: v.contiguous() for k, v in state.items()}, metadata)


def jpeg(color: tuple[int, int, int], size: tuple[int, int] = (48, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def loras(tiny_sd1: LoadedModel) -> dict[str, bytes]:
    return {name: lora(tiny_sd1, seed) for seed, name in enumerate(["ink", "key", "cut", "slow"])}


@pytest.fixture(scope="module")
def civitai(loras: dict[str, bytes]) -> Iterator[FakeCivitai]:
    with FakeCivitai(slow_seconds=2.5) as fake:
        fake.add_version(11, 1, FakeFile("ink style.safetensors", loras["ink"]),
                         trained_words=["inkstyle", " sketch "], image=jpeg((200, 30, 40)),
                         description="<p>Ink.</p>")  # fmt: skip
        fake.add_version(21, 2, FakeFile("key.safetensors", loras["key"]), key=KEY,
                         base_model="SDXL 1.0", image=jpeg((1, 2, 3)))  # fmt: skip
        fake.add_version(31, 3, FakeFile("cut.safetensors", loras["cut"], how="lie"))
        fake.add_version(41, 4, FakeFile("slow.safetensors", loras["slow"], how="slow"))
        fake.add_version(51, 5, FakeFile("..\\../evil.safetensors", loras["cut"]))
        yield fake


def make_service(tmp_path: Path) -> Service:
    settings = parse_settings(["--data-dir", str(tmp_path), "--device", "cpu"], env={})
    settings.loras_dirs[0].mkdir(parents=True, exist_ok=True)
    return build_service(settings)


def sources_for(service: Service, civitai: FakeCivitai) -> LoraSources:
    policy = IngestPolicy.from_settings(service.settings)
    policy = IngestPolicy(policy.lora_folder, policy.checkpoint_folder, 50 * MB, allow_http=True)
    return LoraSources(service, policy, civitai_endpoint=civitai.url, timeout=1.0)


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


# ---------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("https://civitai.com/models/12", CivitaiTarget(12, None)),
        ("https://civitai.com/models/12/ink-style?modelVersionId=34", CivitaiTarget(12, 34)),
        ("https://civitai.com/api/download/models/34?type=Model", CivitaiTarget(None, 34)),
        ("https://civitai.com/api/v1/model-versions/34", CivitaiTarget(None, 34)),
    ],
)
def test_civitai_links(url: str, target: CivitaiTarget) -> None:
    assert parse_civitai_url(url) == target


def test_other_links_are_refused_naming_the_field() -> None:
    with pytest.raises(InvalidRequestError, match="not a Civitai model or version link") as error:
        parse_civitai_url("https://civitai.com/user/someone")
    assert error.value.field == "source"


@pytest.mark.parametrize(
    ("text", "repo", "path", "revision"),
    [
        ("org/ink", "org/ink", None, None),
        ("https://huggingface.co/org/ink", "org/ink", None, None),
        ("https://huggingface.co/org/ink/blob/main/a/b.safetensors", "org/ink", "a/b.safetensors",
         "main"),
        ("https://huggingface.co/org/ink/tree/v2", "org/ink", None, "v2"),
    ],
)  # fmt: skip
def test_hub_links(text: str, repo: str, path: str | None, revision: str | None) -> None:
    reference = hub_reference(text)
    assert reference is not None
    assert (reference.repo_id, reference.filename, reference.revision) == (repo, path, revision)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("https://huggingface.co/org", "not a Hub model link"),
        ("https://huggingface.co/org/ink/blob/main/model.bin", "only a .safetensors file"),
        ("https://huggingface.co/org/ink/resolve/main/../x.safetensors", "only a .safetensors"),
    ],
)
def test_bad_hub_links_name_the_field(text: str, reason: str) -> None:
    with pytest.raises(InvalidRequestError, match=reason) as error:
        hub_reference(text)
    assert error.value.field == "source"


@pytest.mark.parametrize(
    ("base", "families", "expected"),
    [
        ("SD 1.5", (), "SD1"),
        ("SDXL 1.0", (), "SDXL"),
        ("SD 2.1 768", (), "SD2"),
        ("stabilityai/stable-diffusion-xl-base-1.0", (), "SDXL"),
        ("runwayml/stable-diffusion-v1-5", (), "SD1"),
        ("Flux.1 D", (), "Unknown"),
        ("SD 1.5", ("SD1", "SD2"), "SD1"),  # the source settles what the keys cannot
        ("SDXL 1.0", ("SD1", "SD2"), "Unknown"),  # they disagree: trust neither
        ("SDXL 1.0", ("SD1",), "SD1"),  # the file's own keys win
    ],
)
def test_sd_version(base: str, families: tuple[str, ...], expected: str) -> None:
    assert sd_version(base, families) == expected


# ---------------------------------------------------------------------------- Civitai add


def test_civitai_add_writes_the_card_the_registry_reads(
    tmp_path: Path, civitai: FakeCivitai, loras: dict[str, bytes]
) -> None:
    service = make_service(tmp_path)
    sources = sources_for(service, civitai)
    result = sources.add(f"{civitai.url}/models/1/ink", Credentials())
    folder = service.settings.loras_dirs[0]
    assert result.placed is not None
    assert result.placed.sha256 == hashlib.sha256(loras["ink"]).hexdigest()
    assert sorted(os.listdir(folder)) == [
        "ink style.civitai.info",
        "ink style.json",
        "ink style.preview.png",
        "ink style.safetensors",
    ]
    info = json.loads((folder / "ink style.civitai.info").read_text())
    assert info == civitai.versions[11]
    # the registry reads the sidecars back
    entry = service.resolve_lora("ink style")
    assert entry.activation_text == "inkstyle, sketch"
    assert entry.sidecar["sd version"] == "SD1"
    assert entry.sidecar["notes"] == f"Civitai: {civitai.url}/models/1?modelVersionId=11"
    assert entry.preview == folder / "ink style.preview.png"
    with Image.open(entry.preview) as preview:
        assert preview.format == "PNG"
    assert (
        np.abs(pixels(entry.preview.read_bytes()) - pixels(civitai.images["v11.jpeg"])).max() == 0
    )
    summary = result.summary()
    assert summary["trigger_words"] == ["inkstyle", "sketch"] and summary["source"] == "Civitai"


def test_civitai_add_version_link_needs_the_key_and_never_shows_it(
    tmp_path: Path, civitai: FakeCivitai, caplog: pytest.LogCaptureFixture
) -> None:
    service = make_service(tmp_path)
    sources = sources_for(service, civitai)
    link = f"{civitai.url}/models/2?modelVersionId=21"
    with pytest.raises(UnusableFileError, match="HTTP 401"):
        sources.add(link, Credentials())
    caplog.set_level(logging.DEBUG)
    civitai.requests.clear()
    result = sources.add(link, Credentials.of(None, f"  {KEY} "), filename="mine.safetensors")
    assert result.placed is not None and result.placed.filename == "mine.safetensors"
    folder = service.settings.loras_dirs[0]
    # 1. the key went to the API host only
    with_key = {path for _, path, headers in civitai.requests if KEY in str(headers)}
    assert with_key == {"/api/v1/model-versions/21", "/api/download/models/21"}
    assert ("GET", "/images/v21.jpeg") in [r[:2] for r in civitai.requests]  # fetched, keyless
    # 2. and nowhere else: logs, sidecars, the answer, any repr
    assert KEY not in caplog.text
    for path in folder.iterdir():
        assert KEY.encode() not in path.read_bytes(), path.name
    assert KEY not in json.dumps(result.summary()) and KEY not in repr(result)
    assert KEY not in repr(Credentials.of(TOKEN, KEY)) and TOKEN not in repr(
        Credentials.of(TOKEN, KEY)
    )
    assert service.resolve_lora("mine").sidecar["sd version"] == "Unknown"  # SDXL said, SD1 keys


@pytest.mark.parametrize(
    ("link", "error", "reason"),
    [
        ("/models/99", NotFoundError, "model 99: Civitai has no such entry"),
        ("/models/3", UnusableFileError, "cut.safetensors: the download failed.*nothing was kept"),
        ("/models/4", UnusableFileError, "slow.safetensors: the download failed.*ReadTimeout"),
        ("/user/x", InvalidRequestError, "not a Civitai model or version link"),
    ],
)
def test_civitai_failures_leave_nothing(
    tmp_path: Path, civitai: FakeCivitai, link: str, error: type[Exception], reason: str
) -> None:
    service = make_service(tmp_path)
    sources = sources_for(service, civitai)
    folder = service.settings.loras_dirs[0]
    (folder / "keep.safetensors").write_bytes(b"mine")
    with pytest.raises(error, match=reason):
        sources.add(f"{civitai.url}{link}", Credentials())
    assert os.listdir(folder) == ["keep.safetensors"]


def test_a_server_given_name_never_leaves_the_folder(tmp_path: Path, civitai: FakeCivitai) -> None:
    service = make_service(tmp_path)
    result = sources_for(service, civitai).add(f"{civitai.url}/models/5", Credentials())
    assert result.placed is not None and result.placed.filename == "evil.safetensors"
    assert result.placed.path.parent == service.settings.loras_dirs[0]
    assert not (tmp_path / "evil.safetensors").exists()
    assert not (tmp_path.parent / "evil.safetensors").exists()


def test_downloads_off_refuses_before_any_request(tmp_path: Path, civitai: FakeCivitai) -> None:
    service = make_service(tmp_path)
    policy = IngestPolicy(service.settings.loras_dirs[0], tmp_path, MB, downloads=False)
    sources = LoraSources(service, policy, civitai_endpoint=civitai.url)
    civitai.requests.clear()
    with pytest.raises(InvalidRequestError, match="downloads are disabled"):
        sources.add(f"{civitai.url}/models/1", Credentials())
    with pytest.raises(InvalidRequestError, match="downloads are disabled"):
        sources.fetch_info("anything", Credentials())
    assert civitai.requests == []


# ---------------------------------------------------------------------------- fetch info


def test_fetch_info_by_hash_keeps_the_users_edits(
    tmp_path: Path, civitai: FakeCivitai, loras: dict[str, bytes]
) -> None:
    service = make_service(tmp_path)
    folder = service.settings.loras_dirs[0]
    (folder / "mine.safetensors").write_bytes(loras["ink"])  # renamed on disk: found by hash
    (folder / "mine.json").write_text(json.dumps({"activation text": "my words", "extra": 1}))
    (folder / "mine.png").write_bytes(b"my own preview")
    service.rescan()
    civitai.requests.clear()
    result = sources_for(service, civitai).fetch_info("mine", Credentials())
    digest = hashlib.sha256(loras["ink"]).hexdigest().upper()
    assert ("GET", f"/api/v1/model-versions/by-hash/{digest}") in [r[:2] for r in civitai.requests]
    assert not any("/images/" in path for _, path, _ in civitai.requests)  # it has a preview
    assert result.sidecars == ("mine.civitai.info", "mine.json")
    entry = service.resolve_lora("mine")
    assert entry.activation_text == "my words"  # the user's own, kept
    assert entry.sidecar["extra"] == 1 and entry.sidecar["sd version"] == "SD1"
    assert entry.sidecar["description"] == "<p>Ink.</p>"
    assert (folder / "mine.png").read_bytes() == b"my own preview"


def test_fetch_info_unknown_file_is_a_404_naming_it(
    tmp_path: Path, civitai: FakeCivitai, tiny_sd1: LoadedModel
) -> None:
    service = make_service(tmp_path)
    (service.settings.loras_dirs[0] / "stranger.safetensors").write_bytes(lora(tiny_sd1, 9))
    service.rescan()
    with pytest.raises(NotFoundError, match="stranger: Civitai knows no file with sha256") as error:
        sources_for(service, civitai).fetch_info("stranger", Credentials())
    assert error.value.field == "name"
    with pytest.raises(NotFoundError):
        sources_for(service, civitai).fetch_info("../stranger", Credentials())


def test_make_preview_replaces_the_png_with_its_infotext(tmp_path: Path) -> None:
    weights = tmp_path / "ink.safetensors"
    weights.write_bytes(b"x")
    (tmp_path / "ink.png").write_bytes(b"old")
    image = Image.new("RGB", (64, 64), (10, 200, 30))
    target = replace_preview(weights, image, "a cat\nSteps: 2")
    assert target == tmp_path / "ink.png"
    with Image.open(target) as written:
        assert written.info["parameters"] == "a cat\nSteps: 2"
        assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(image))
    assert sorted(os.listdir(tmp_path)) == ["ink.png", "ink.safetensors"]  # no temp left


# ---------------------------------------------------------------------------- Hub cards

HUB_CLIENT = textwrap.dedent("""
    import json, logging, os, sys
    from pathlib import Path
    from deployments.ingest import IngestPolicy
    from deployments.lora_sources import Credentials, LoraSources
    from pipelines.errors import LorastackError
    from pipelines.service import build_service
    from pipelines.settings import parse_settings

    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    data = Path(sys.argv[1])
    settings = parse_settings(["--data-dir", str(data), "--device", "cpu"])  # + CIVITAI_ENDPOINT
    settings.loras_dirs[0].mkdir(parents=True, exist_ok=True)
    service = build_service(settings)
    policy = IngestPolicy(settings.loras_dirs[0], settings.models_dirs[0], 50 << 20,
                          allow_http=True)
    sources = LoraSources(service, policy, civitai_endpoint=settings.civitai_endpoint)
    for action, value, token in json.loads(sys.argv[2]):
        result = {"action": action, "value": value}
        try:
            credentials = Credentials.of(token, None)
            done = getattr(sources, action)(value, credentials)
            result["summary"] = done.summary()
            entry = service.resolve_lora(done.name)
            result["entry"] = {"activation": entry.activation_text, "sidecar": entry.sidecar,
                               "preview": entry.preview.name if entry.preview else None}
        except LorastackError as error:
            result["error"] = f"{type(error).__name__}: {error.message}"
        print("RESULT " + json.dumps(result), flush=True)
    print("FOLDER " + json.dumps(sorted(os.listdir(settings.loras_dirs[0]))), flush=True)
""")

CARD = """---
base_model: stabilityai/stable-diffusion-xl-base-1.0
instance_prompt: {prompt}
widget:
- text: a photo of a cat, {prompt}
  output:
    url: images/example.png
---
# {name}
"""


@pytest.fixture(scope="module")
def hub_run(
    tmp_path_factory: pytest.TempPathFactory, loras: dict[str, bytes], tiny_sd1: LoadedModel
) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("hubcards")
    (root / "ink" / "images").mkdir(parents=True)
    (root / "ink" / "ink.safetensors").write_bytes(loras["ink"])
    (root / "ink" / "README.md").write_text(CARD.format(prompt="inkstyle", name="ink"))
    image = io.BytesIO()
    Image.new("RGB", (40, 24), (0, 90, 250)).save(image, format="PNG")
    (root / "ink" / "images" / "example.png").write_bytes(image.getvalue())
    (root / "bare").mkdir()
    (root / "bare" / "bare.safetensors").write_bytes(loras["key"])
    data = root / "data"
    folder = data / "loras"
    folder.mkdir(parents=True)
    named = lora(tiny_sd1, 7, {"ss_huggingface_repo_id": "org/ink"})
    (folder / "named.safetensors").write_bytes(named)
    steps = [
        ["add", "https://huggingface.co/org/ink", TOKEN],
        ["add", "org/bare", None],
        ["add", "org/missing", None],
        ["fetch_info", "named", None],
    ]
    with FakeHub() as hub, FakeCivitai() as civitai:
        hub.add_repo("org/ink", root / "ink")
        hub.add_repo("org/bare", root / "bare")
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
            "LORASTACK_CIVITAI_ENDPOINT": civitai.url,
        }
        done = subprocess.run(
            [sys.executable, "-c", HUB_CLIENT, str(data), json.dumps(steps)],
            env=environment,
            cwd=PROJECT_DIR,
            capture_output=True,
            text=True,
            timeout=180,
        )
        civitai_requests = list(civitai.requests)
    assert done.returncode == 0, done.stderr[-4000:]
    results = {
        f"{line['action']} {line['value']}": line
        for line in (json.loads(x[7:]) for x in done.stdout.splitlines() if x.startswith("RESULT "))
    }
    folder_line = next(x for x in done.stdout.splitlines() if x.startswith("FOLDER "))
    return {
        "results": results,
        "folder": json.loads(folder_line[7:]),
        "stderr": done.stderr,
        "hub_requests": hub.requests,
        "civitai_requests": civitai_requests,
        "image": image.getvalue(),
        "folder_path": folder,
    }


def test_hub_add_reads_the_model_card(hub_run: dict[str, Any]) -> None:
    result = hub_run["results"]["add https://huggingface.co/org/ink"]
    assert "error" not in result, result
    assert result["summary"]["trigger_words"] == ["inkstyle"]
    assert result["entry"]["activation"] == "inkstyle"
    assert result["entry"]["preview"] == "ink.preview.png"
    sidecar = result["entry"]["sidecar"]
    assert sidecar["notes"].startswith("Hub: http://127.0.0.1:") and sidecar["notes"].endswith(
        "/org/ink"
    )
    # the card says SDXL, the file's keys say SD1/SD2: "Unknown", not a guess
    assert sidecar["sd version"] == "Unknown"
    preview = (hub_run["folder_path"] / "ink.preview.png").read_bytes()
    assert np.array_equal(pixels(preview), pixels(hub_run["image"]))
    assert TOKEN not in hub_run["stderr"]  # huggingface_hub's own debug logging included


def test_hub_add_without_a_card_and_unknown_repos(hub_run: dict[str, Any]) -> None:
    bare = hub_run["results"]["add org/bare"]
    assert "error" not in bare, bare
    assert bare["summary"]["trigger_words"] == [] and bare["entry"]["preview"] is None
    missing = hub_run["results"]["add org/missing"]
    assert missing["error"].startswith("NotFoundError: org/missing: not found on the Hub")
    assert not any(name.startswith(".") for name in hub_run["folder"])


def test_fetch_info_reads_the_hub_repo_the_metadata_names(hub_run: dict[str, Any]) -> None:
    result = hub_run["results"]["fetch_info named"]
    assert "error" not in result, result
    assert result["entry"]["activation"] == "inkstyle"
    assert result["entry"]["preview"] == "named.preview.png"
    assert any("by-hash" in path for _, path, _ in hub_run["civitai_requests"])  # Civitai first


# ---------------------------------------------------------------------------- API


def api_client(service: Service, civitai: FakeCivitai, **flags: Any) -> TestClient:
    settings = replace(service.settings, **flags)
    return TestClient(build_api(service, settings, sources_for(service, civitai)))


def test_api_add_and_fetch_info(
    tmp_path: Path, civitai: FakeCivitai, loras: dict[str, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    service = make_service(tmp_path)
    with api_client(service, civitai) as client:
        added = client.post(
            "/loras/add",
            json={"source": f"{civitai.url}/models/2", "civitai_api_key": KEY, "overwrite": False},
        )
        assert added.status_code == 200, added.text
        assert added.json()["filename"] == "key.safetensors"
        assert added.json()["sidecars"] == ["key.civitai.info", "key.json", "key.preview.png"]
        listed = {item["name"]: item for item in client.get("/loras").json()}
        assert "key" in listed
        again = client.post("/loras/add", json={"source": f"{civitai.url}/models/2",
                                                "civitai_api_key": KEY})  # fmt: skip
        assert again.status_code == 422 and "already in" in again.json()["detail"]
        (service.settings.loras_dirs[0] / "key.json").unlink()
        fetched = client.post("/loras/fetch-info", json={"name": "key"})
        assert fetched.status_code == 200, fetched.text
        assert fetched.json()["sidecars"] == ["key.civitai.info", "key.json"]
        assert fetched.json()["page_url"] == f"{civitai.url}/models/2?modelVersionId=21"
        missing = client.post("/loras/fetch-info", json={"name": "nope"})
        assert missing.status_code == 404
    assert KEY not in caplog.text


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        ({"source": "x", "token": "t"}, 422, "unknown field 'token'"),
        ({"source": 3}, 422, "source must be str"),
        ({"overwrite": True}, 422, "source is required"),
        ({"source": "x", "overwrite": "yes"}, 422, "overwrite must be bool"),
        ({"source": "plain words"}, 422, "neither a Civitai link nor a Hub repo"),
        ([], 422, "must be a JSON object"),
    ],
)
def test_api_refuses_bad_fields_by_name(
    tmp_path: Path, civitai: FakeCivitai, body: Any, status: int, detail: str
) -> None:
    with api_client(make_service(tmp_path), civitai) as client:
        answer = client.post("/loras/add", json=body)
    assert answer.status_code == status and detail in answer.json()["detail"], answer.text


def test_api_adding_is_an_admin_action_on_a_shared_server(
    tmp_path: Path, civitai: FakeCivitai
) -> None:
    service = make_service(tmp_path)
    civitai.requests.clear()
    with api_client(service, civitai, listen=True, admin_auth="boss:pw") as client:
        link = {"source": f"{civitai.url}/models/1"}
        refused = client.post("/loras/add", json=link, headers={"X-Admin-Auth": "boss:wrong"})
        assert refused.status_code == 401 and "admin action" in refused.json()["detail"]
        assert client.post("/loras/fetch-info", json={"name": "x"}).status_code == 401
        assert civitai.requests == []
        allowed = client.post("/loras/add", json=link, headers={"X-Admin-Auth": "boss:pw"})
        assert allowed.status_code == 200, allowed.text


# ---------------------------------------------------------------------------- page


@pytest.mark.parametrize(
    ("gallery", "index", "expected"),
    [
        (None, 0, None),
        ([("a.png", "seed 1"), ("b.png", "seed 2")], 1, "b.png"),
        ([("a.png", "seed 1")], 5, "a.png"),  # a stale index: the last image
        ([{"image": {"path": "c.png"}, "caption": None}], 0, "c.png"),
    ],
)
def test_make_preview_takes_the_chosen_gallery_image(
    gallery: list | None, index: int, expected: str | None
) -> None:
    assert chosen_image(gallery, index) == expected


def test_make_preview_without_an_image_names_the_gallery(tmp_path: Path) -> None:
    with pytest.raises(LorastackError, match="generate an image first") as error:
        make_preview(make_service(tmp_path), "ink", [], 0)
    assert error.value.field == "gallery"


def test_page_add_and_fetch_lines(tmp_path: Path, civitai: FakeCivitai) -> None:
    service = make_service(tmp_path)
    sources = sources_for(service, civitai)
    line, signature = add_lora(service, sources, f"{civitai.url}/models/1", Credentials(), False)
    assert line.startswith("Added **ink style** from Civitai") and signature is not None
    assert "trigger words inkstyle, sketch" in line and "`ink style.preview.png`" in line
    again, unchanged = add_lora(service, sources, f"{civitai.url}/models/1", Credentials(), False)
    assert again.startswith("Refused: ink style.safetensors: a file of that name") and not unchanged
    line, _ = fetch_info(service, sources, " ink style ", Credentials.of(None, KEY))
    assert line.startswith("Fetched info for **ink style**") and KEY not in line
    missing, _ = fetch_info(service, sources, "nope", Credentials())
    assert missing.startswith("Refused:") and "nope" in missing


def test_make_preview_is_an_admin_action_only_on_a_shared_server() -> None:
    def check(user: str, password: str) -> str | None:
        return None if (user, password) == ("boss", "pw") else "wrong admin user or password"

    assert preview_refusal(None, "", "") is None  # this machine only: nobody is asked
    assert preview_refusal(check, "boss", "pw") is None
    refusal = preview_refusal(check, "boss", "nope")
    assert refusal is not None and "admin action" in refusal and "wrong admin" in refusal
