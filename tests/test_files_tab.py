"""The Add files tab against a real service (uploads, downloads from a local HTTP server,
refusals, admin flags, hidden paths, the temporary-disk warning), and the per-user limits
and ZeroGPU path of the page's generate event, through its callback and a live server."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import pytest
import torch
from safetensors.torch import save

from deployments.ingest import IngestPolicy
from deployments.zerogpu import ZeroGpuRunner
from frontends.page.files_tab import add_download, add_uploads, storage_notes
from frontends.page.hires_panel import OFF as HIRES_OFF
from frontends.page.ui import build_ui
from pipelines.engine import Engine
from pipelines.interface import DEMO_MODEL_NAME
from pipelines.limits import UserLimits, user_key
from pipelines.loading import LoadedModel
from pipelines.service import Service, build_folders, build_service
from pipelines.settings import PROJECT_DIR, Settings
from tests.ldm_export import save_single_file
from tests.test_api import start_app, stop_app
from tests.test_app_http import wait_for
from tests.test_ingest import FileServer, listing, sha
from tests.test_lora import SD1_MODULES, make_kohya, sd1_keys, write

MB = 1024 * 1024


@pytest.fixture(scope="module")
def lora_bytes(tiny_sd1: LoadedModel) -> bytes:
    state = make_kohya(tiny_sd1.pipe, SD1_MODULES, sd1_keys(SD1_MODULES), seed=5)
    return save({k: v.contiguous() for k, v in state.items()})


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory: pytest.TempPathFactory, tiny_sd1: LoadedModel) -> bytes:
    path = tmp_path_factory.mktemp("files-ckpt") / "tiny.safetensors"
    save_single_file(tiny_sd1.pipe, path, text_encoder_layout="hf")
    return path.read_bytes()


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, tiny_sd1: LoadedModel) -> Service:
    """The demo model, one LoRA (ink) in the data dir's loras/ (where new files go)."""
    data = tmp_path_factory.mktemp("files-data")
    keys = sd1_keys(SD1_MODULES)
    write(data / "loras" / "ink.safetensors", make_kohya(tiny_sd1.pipe, SD1_MODULES, keys, seed=1))
    (data / "models").mkdir()
    engine = build_service(Settings(data_dir=data, threads=2))
    engine.select_checkpoint(None)
    return engine


def with_limits(engine: Service, limits: UserLimits) -> Service:
    """Another service on the same folders whose job queue keeps `limits`."""
    return build_service(engine.settings, folders=engine.folders, limits=limits)


def policy_for(engine: Service, **rules: Any) -> IngestPolicy:
    """The engine's own folders, plain http to 127.0.0.1 allowed (the local test server)."""
    return IngestPolicy(
        lora_folder=engine.settings.loras_dirs[0],
        checkpoint_folder=engine.settings.models_dirs[0],
        max_bytes=rules.pop("max_bytes", 50 * MB),
        allow_http=True,
        **rules,
    )


def received(tmp_path: Path, name: str, data: bytes) -> str:
    """An upload as Gradio hands it over: a temp file under its original name."""
    path = tmp_path / "gradio" / sha(data)[:8] / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def lora_names(engine: Service) -> set[str]:
    return {entry.name for entry in engine.loras()}


# ---------------------------------------------------------------------------- uploads


def test_uploaded_lora_is_listed_with_its_facts(
    engine: Service, tmp_path: Path, lora_bytes: bytes
) -> None:
    upload = received(tmp_path, "pen.safetensors", lora_bytes)
    text = add_uploads(engine, policy_for(engine), [upload], "LoRA", False, hide_paths=True)
    assert text.startswith("Added **pen.safetensors**: LoRA (SD1")
    assert "added as `loras/pen.safetensors`" in text
    assert str(engine.settings.data_dir) not in text and str(tmp_path) not in text
    assert "pen" in lora_names(engine)  # rescanned: the list and the cards pick it up
    placed = engine.settings.loras_dirs[0] / "pen.safetensors"
    assert placed.read_bytes() == lora_bytes


def test_each_file_gets_its_result_or_reason(
    engine: Service, tmp_path: Path, lora_bytes: bytes, checkpoint_bytes: bytes
) -> None:
    folder = engine.settings.loras_dirs[0]
    before = listing(folder)
    files = [
        received(tmp_path, "model.safetensors", checkpoint_bytes),
        received(tmp_path, "notes.txt", b"hello"),
        received(tmp_path, "ink.safetensors", lora_bytes),  # the name is taken
        received(tmp_path, "brush.safetensors", lora_bytes),
    ]
    files.append(received(tmp_path, "evil.safetensors", b"\x00" * 20))
    text = add_uploads(engine, policy_for(engine), files, "LoRA", False, hide_paths=True)
    lines = text.splitlines()
    assert len(lines) == 5
    assert lines[4].startswith("Refused **evil.safetensors**: ") and "header" in lines[4]
    assert lines[4].count("evil.safetensors") == 1  # named once, not "evil: evil: ..."
    assert lines[0].startswith("Refused **model.safetensors**:") and "LoRA" in lines[0]
    assert lines[1].startswith("Refused **notes.txt**:") and "only .safetensors" in lines[1]
    assert lines[2].startswith("Refused **ink.safetensors**:") and "already in loras/" in lines[2]
    assert lines[3].startswith("Added **brush.safetensors**")
    assert listing(folder) == sorted([*before, "brush.safetensors"])
    assert (folder / "ink.safetensors").read_bytes() != lora_bytes  # left as it was


def test_overwrite_replaces_only_when_asked(
    engine: Service, tmp_path: Path, lora_bytes: bytes
) -> None:
    target = engine.settings.loras_dirs[0] / "ink.safetensors"
    old = target.read_bytes()
    upload = received(tmp_path, "ink.safetensors", lora_bytes)
    refused = add_uploads(engine, policy_for(engine), [upload], "LoRA", False, hide_paths=True)
    assert "already in loras/" in refused and target.read_bytes() == old
    try:
        text = add_uploads(engine, policy_for(engine), [upload], "LoRA", True, hide_paths=True)
        assert "replaced as `loras/ink.safetensors`" in text
        assert target.read_bytes() == lora_bytes
    finally:
        target.write_bytes(old)
        engine.rescan()


def test_admin_flags_refuse_with_the_reason(
    engine: Service, tmp_path: Path, lora_bytes: bytes, checkpoint_bytes: bytes
) -> None:
    folder = engine.settings.loras_dirs[0]
    before = listing(folder), listing(engine.settings.models_dirs[0])
    upload = received(tmp_path, "off.safetensors", lora_bytes)
    off = policy_for(engine, uploads=False, downloads=False)
    text = add_uploads(engine, off, [upload], "LoRA", False, hide_paths=True)
    disabled = "uploads are disabled on this server (--disable-uploads)"
    assert text == f"Refused **off.safetensors**: {disabled}"
    text = add_download(engine, off, "org/repo", "LoRA", "", False, hide_paths=True)
    assert "downloads are disabled on this server (--disable-downloads)" in text
    model = received(tmp_path, "model.safetensors", checkpoint_bytes)
    text = add_uploads(engine, policy_for(engine), [model], "Checkpoint", False, hide_paths=True)
    assert "--allow-checkpoint-uploads" in text and text.startswith("Refused")
    small = policy_for(engine, max_bytes=1024)
    text = add_uploads(engine, small, [upload], "LoRA", False, hide_paths=True)
    assert "over the 0.0 MB limit" in text
    assert add_uploads(engine, off, [], "LoRA", False, hide_paths=True).startswith("Choose")
    assert (listing(folder), listing(engine.settings.models_dirs[0])) == before


def test_checkpoint_upload_when_allowed_shows_in_the_menu(
    engine: Service, tmp_path: Path, checkpoint_bytes: bytes
) -> None:
    model = received(tmp_path, "tiny upload.safetensors", checkpoint_bytes)
    allowed = policy_for(engine, checkpoints=True)
    try:
        text = add_uploads(engine, allowed, [model], "Checkpoint", False, hide_paths=False)
        target = engine.settings.models_dirs[0] / "tiny upload.safetensors"
        assert text.startswith("Added **tiny upload.safetensors**: checkpoint (SD1)")
        assert f"`{target}`" in text  # paths not hidden: the host path is shown
        titles = [entry.title for entry in engine.checkpoints()]
        assert any(title.startswith("tiny upload.safetensors") for title in titles)
    finally:
        (engine.settings.models_dirs[0] / "tiny upload.safetensors").unlink(missing_ok=True)
        engine.rescan()


# ---------------------------------------------------------------------------- downloads


@pytest.fixture(scope="module")
def files(lora_bytes: bytes) -> Iterator[FileServer]:
    with FileServer() as server:
        server.routes.update(
            {
                "/sky.safetensors": (200, {}, lora_bytes, "ok"),
                "/drop/cut.safetensors": (200, {}, lora_bytes, "drop"),
                "/error/bad.safetensors": (500, {}, b"internal error", "ok"),
            }
        )
        yield server


def test_download_feeds_the_progress_bar_and_lists_the_file(
    engine: Service, files: FileServer, lora_bytes: bytes
) -> None:
    seen: list[tuple[Any, str]] = []

    def progress(value: Any, desc: str = "", **_: Any) -> None:
        seen.append((value, desc))

    text = add_download(
        engine,
        policy_for(engine),
        files.url("/sky.safetensors"),
        "LoRA",
        f"  {sha(lora_bytes).upper()} ",
        False,
        hide_paths=True,
        progress=progress,
    )
    assert text.startswith("Added **sky.safetensors**: LoRA") and "`loras/sky.safetensors`" in text
    assert "sky" in lora_names(engine)
    assert seen and seen[-1][0] == 1.0 and " of " in seen[-1][1]
    assert all(0 <= value <= 1 for value, _ in seen)


def test_failed_downloads_say_why_and_leave_nothing(
    engine: Service, files: FileServer, lora_bytes: bytes
) -> None:
    folder = engine.settings.loras_dirs[0]
    before = listing(folder)
    policy = policy_for(engine)
    cases = {
        "/drop/cut.safetensors": "nothing was kept",
        "/error/bad.safetensors": "HTTP 500",
        "/missing.safetensors": "HTTP 404",
    }
    for path, reason in cases.items():
        text = add_download(engine, policy, files.url(path), "LoRA", "", False, hide_paths=True)
        assert text.startswith(f"Refused **{files.url(path)}**:") and reason in text, text
    text = add_download(
        engine, policy, files.url("/sky.safetensors"), "LoRA", "0" * 64, True, hide_paths=True
    )
    assert "sha256 is" in text and "expected " + "0" * 64 in text
    assert add_download(engine, policy, "  ", "LoRA", "", False, hide_paths=True).startswith(
        "Refused **(nothing)**: nothing to download"
    )
    # Without the test-only allowance, a local address is refused (a public server must
    # not fetch from its own network).
    strict = IngestPolicy(folder, engine.settings.models_dirs[0], 50 * MB)
    text = add_download(
        engine, strict, files.url("/sky.safetensors"), "LoRA", "", True, hide_paths=True
    )
    assert "only https:// links" in text
    assert listing(folder) == before


# ---------------------------------------------------------------------------- the page


def make_page(engine: Service, **options: Any) -> gr.Blocks:
    """`build_ui` inside a running event loop: built outside one, Gradio opens event loops
    that it never closes (ResourceWarning)."""

    async def build() -> gr.Blocks:
        return build_ui(engine, engine.settings, **options)

    return asyncio.run(build())


def page_text(page: gr.Blocks) -> str:
    """Every Markdown value on the page, joined."""
    return "\n".join(
        str(block.value) for block in page.blocks.values() if isinstance(block, gr.Markdown)
    )


def test_temporary_disk_warning_and_disabled_controls_on_the_page(engine: Service) -> None:
    on_space = IngestPolicy(PROJECT_DIR / "loras", PROJECT_DIR / "models", MB, checkpoints=True)
    notes = storage_notes(on_space, {"SPACE_ID": "me/space"})
    assert len(notes) == 2 and "loras/" in notes[0] and "models/" in notes[1]
    assert storage_notes(on_space, {}) == []
    page = make_page(engine, policy=on_space, env={"SPACE_ID": "me/space"})
    text = page_text(page)
    assert "Temporary disk" in text and "a restart wipes them" in text
    assert "Uploads are disabled" not in text
    assert "open_folder" not in elem_ids(page)  # it would open on the Space's machine

    closed = IngestPolicy(PROJECT_DIR / "loras", PROJECT_DIR / "models", MB, False, False)
    local = make_page(engine, policy=closed, env={})
    assert {"open_folder", "img2img_open_folder"} <= elem_ids(local)  # a local user's
    text = page_text(local)
    assert "Uploads are disabled on this server (`--disable-uploads`)" in text
    assert "Downloads are disabled on this server (`--disable-downloads`)" in text
    assert "Temporary disk" not in text and "Checkpoints cannot be added here" in text


def elem_ids(page: gr.Blocks) -> set[str]:
    return {block.elem_id for block in page.blocks.values() if getattr(block, "elem_id", None)}


def generate_event(page: gr.Blocks) -> Any:
    """The page's `/txt2img` event function."""
    (function,) = [f.fn for f in page.fns.values() if f.api_name == "txt2img"]
    return function


XYZ_DEFAULTS = {
    "x_type": "Seed",
    "x_values": "",
    "y_type": "Nothing",
    "y_values": "",
    "z_type": "Nothing",
    "z_values": "",
    "draw_legend": True,
    "no_fixed_seeds": False,
    "vary_seeds_x": False,
    "vary_seeds_y": False,
    "vary_seeds_z": False,
    "include_lone_images": False,
    "include_sub_grids": False,
    "margin_size": 0,
}
PAGE_OFF = {
    **HIRES_OFF,
    "script_name": "None",
    "prompts_iterate_seed": False,
    "prompts_same_seed": False,
    "prompts_position": "start",
    "prompts_text": "",
    **{f"xyz_{name}": value for name, value in XYZ_DEFAULTS.items()},
}
"""The Hires fix and Script values of a new page: off."""


def start_generate(
    page: gr.Blocks, request: gr.Request, loras: list | None = None, steps: int = 1
) -> Any:
    values = ["a tower", "", steps, 7.0, "Euler", "Automatic", 3, 64, 64, 1, 1, 1]
    extra = [-1, 0.0, 0, 0, False, "CPU", 0]  # subseed, strength, resize w/h, tiling, source, ENSD
    callback = generate_event(page)
    return callback(
        *values,
        DEMO_MODEL_NAME,
        loras or [],
        *extra,
        **PAGE_OFF,
        request=request,
        progress=lambda *a, **k: None,
    )


def press_generate(page: gr.Blocks, request: gr.Request, loras: list | None = None) -> list:
    return list(start_generate(page, request, loras))


def visitor(username: str | None = None, host: str = "10.0.0.7") -> gr.Request:
    return gr.Request(username=username, session_hash=f"s-{username}-{host}", client={"host": host})


def test_rate_limit_through_the_generate_callback(engine: Service) -> None:
    page = make_page(with_limits(engine, UserLimits(rate_limit=1)), env={})
    assert press_generate(page, visitor("ann"))[-1][2] == [3]  # (gallery, infotext, seeds, ...)
    with pytest.raises(gr.Error, match=r"rate limit: at most 1 requests a minute.*try again in"):
        press_generate(page, visitor("ann", host="10.0.0.8"))  # same user, another address
    assert press_generate(page, visitor("bob"))  # someone else is not affected
    assert press_generate(page, visitor(None, host="10.0.0.9"))  # no login: the address
    with pytest.raises(gr.Error, match="rate limit"):
        press_generate(page, visitor(None, host="10.0.0.9"))
    assert user_key("ann", "1.2.3.4") == "user:ann" and user_key(None, None) == "address:unknown"


def test_queue_slot_is_held_while_the_job_runs(engine: Service) -> None:
    limits = UserLimits(queue_slots=1)
    page = make_page(with_limits(engine, limits), env={})
    stream = start_generate(page, visitor("ann"), steps=2)
    next(stream)  # the job is queued (its id came back)
    assert limits.slots.in_use("user:ann") == 1
    with pytest.raises(gr.Error, match="queue limit"):
        press_generate(page, visitor("ann"))
    list(stream)
    assert limits.slots.in_use("user:ann") == 0


def weights(runner: Engine) -> dict[str, torch.Tensor]:
    assert runner.manager.current is not None
    unet = runner.manager.current.pipe.unet
    return {key: value.detach().clone() for key, value in unet.state_dict().items()}


def test_zerogpu_page_merges_before_the_gpu_call(engine: Service) -> None:
    """With the ZeroGPU runner (`spaces` missing here, so its wrapper is a no-op), a page
    generation merges the stack in the main process before the GPU call, which then has
    nothing to switch or merge."""
    settings = engine.settings
    local = Engine(settings, build_folders(settings))
    local.load(None)
    base = weights(local)
    env = {"SPACES_ZERO_GPU": "1"}
    runner = ZeroGpuRunner(local, env)
    zero = make_page(Service(settings, local.folders, runner), env=env)
    stack = [{"name": "ink", "weight": 0.9}]
    items = press_generate(zero, visitor("z"), stack)
    (result,) = [item for item in items if isinstance(item[2], list) and item[2]]
    assert result[2] == [3] and "<lora:ink:0.9>" in result[1]
    assert runner.inside == [(0, 0)]
    assert not all(torch.equal(value, base[key]) for key, value in weights(local).items())
    normal = make_page(Service(settings, local.folders, local), env={})
    press_generate(normal, visitor("n"), stack)
    assert not all(torch.equal(value, base[key]) for key, value in weights(local).items())


# ---------------------------------------------------------------------------- live server


def test_live_limits_shared_by_page_and_api(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--rate-limit 1`: the API's first request passes; the page and then the API, from
    the same address, are refused (503 + Retry-After in A1111's body). ZeroGPU is switched
    on without `spaces` installed: the app still starts and serves on the CPU."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    monkeypatch.setenv("SPACES_ZERO_GPU", "1")
    args = ["--api", "--rate-limit", "1", "--threads", "1"]
    process, url, log = start_app(args, tmp_path)
    try:
        wait_for(url, process)
        body = json.dumps({"prompt": "a tower", "steps": 1, "width": 64, "height": 64}).encode()

        def post() -> urllib.request.Request:
            return urllib.request.Request(
                url + "sdapi/v1/txt2img", body, {"Content-Type": "application/json"}
            )

        with urllib.request.urlopen(post(), timeout=120) as response:
            assert response.status == 200 and len(json.load(response)["images"]) == 1
        client = Client(url, verbose=False)
        try:
            with pytest.raises(AppError, match="rate limit: at most 1 requests a minute"):
                client.predict(prompt="a tower", steps=1, width=64, height=64,
                               api_name="/txt2img")  # fmt: skip
        finally:
            client.close()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(post(), timeout=120)
        error = refused.value
        assert error.code == 503 and int(error.headers["Retry-After"]) > 0
        payload = json.loads(error.read())
        error.close()
        assert payload["error"] == "BusyError" and "rate limit" in payload["detail"]
        assert set(payload) == {"error", "detail", "body", "errors"}
    finally:
        stop_app(process)
    assert "spaces package is missing" in log.read_text()
