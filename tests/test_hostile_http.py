"""Hostile requests and many users against one live server (`--api --hide-paths`, tiny
models, 64x64, 2 steps): bad values the contract bounds, names that try to leave the
listing, a bounded hypothesis fuzz of txt2img, 8 concurrent clients bit-equal to their
sequential references (also while another client flips the checkpoint), and exposure:
loopback bind, Gradio's file route and host paths.

Error cases already in test_api.py (malformed JSON, steps 1000, width 8, seed -7, batch
99, unknown sampler/scheduler/LoRA/checkpoint, rounding 70 -> 64) are not repeated here.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.infotext import parse_infotext
from pipelines.loading import LoadedModel
from tests.test_api import Server, assert_a1111_error, pixels_of_b64, start_app, stop_app
from tests.test_api import call as call_with_auth
from tests.test_app_http import wait_for
from tests.test_lora import SD1_MODULES, make_kohya, sd1_keys, write

SMALL = {"steps": 2, "width": 64, "height": 64}
SD1, SDXL = "tiny-sd1.safetensors", "xl/tiny-sdxl.safetensors"
BAD_NAME = b"caf\xe9.safetensors"  # not valid UTF-8


def call(server: Server, method: str, path: str, body: Any = None, **extra: Any) -> Any:
    """One unauthenticated request (this server has no --api-auth)."""
    return call_with_auth(server, method, path, body, auth=None, **extra)


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory, tiny_sd1: LoadedModel) -> Path:
    folder = tmp_path_factory.mktemp("hostile-loras")
    keys = sd1_keys(SD1_MODULES)
    for seed, name in enumerate(("ink", "glow", "warm"), start=1):
        write(
            folder / f"{name}.safetensors", make_kohya(tiny_sd1.pipe, SD1_MODULES, keys, seed=seed)
        )
    bad = os.fsdecode(os.fsencode(folder) + b"/" + BAD_NAME)
    shutil.copy(folder / "ink.safetensors", bad)
    return folder


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, loras: Path
) -> Iterator[Server]:
    data = tmp_path_factory.mktemp("hostile-data")
    args = ["--api", "--hide-paths", "--ckpt-dir", str(models_dir), "--lora-dir", str(loras)]
    process, url, log = start_app([*args, "--ckpt", SD1, "--threads", "2"], data)
    try:
        wait_for(url, process)
        made = Server(url, int(url.rsplit(":", 1)[1].strip("/")), data, models_dir, loras, log)
        wait_for_hashes(made)
        yield made
    finally:
        stop_app(process)


def wait_for_hashes(server: Server, seconds: float = 120) -> None:
    """Until the background pass has hashed the single-file checkpoints: a reference made
    before it has no `Model hash` and the same request made after it has one."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        _, _, models = call(server, "GET", "/sd-models")
        singles = [m for m in models if str(m["title"]).split(" [")[0].endswith(".safetensors")]
        if singles and all(m["sha256"] for m in singles):
            return
        time.sleep(0.5)
    raise AssertionError("the checkpoints were not hashed in time")


def snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folders` (symlinks not followed) -> (size, mtime_ns)."""
    found = {}
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                stat = path.stat()
                found[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return found


# ---------------------------------------------------------------- bad requests


@pytest.mark.parametrize(
    ("raw", "status", "words"),
    [
        (b'{"width": 0}', 422, ["width"]),
        (b'{"height": -64}', 422, ["height"]),
        (b'{"width": 100000}', 422, ["width", "2048"]),
        (b'{"width": 4096, "height": 4096}', 422, ["width"]),
        (b'{"width": "64"}', 422, ["width"]),
        (b'{"height": [64]}', 422, ["height"]),
        (b'{"steps": 0}', 422, ["steps"]),
        (b'{"steps": 10000}', 422, ["steps", "150"]),
        (b'{"batch_size": 1000}', 422, ["batch_size"]),
        (b'{"n_iter": 0}', 422, ["n_iter"]),
        (b'{"cfg_scale": NaN}', 422, ["cfg_scale"]),
        (b'{"cfg_scale": Infinity}', 422, ["cfg_scale"]),
        (b'{"cfg_scale": -1}', 422, ["cfg_scale"]),
        (b'{"seed": 4294967296}', 422, ["seed"]),
        (b'{"seed": 18446744073709551616}', 422, ["seed"]),
        (b'{"seed": "7"}', 422, ["seed"]),
        (json.dumps({"prompt": "x" * 100_000}).encode(), 422, ["prompt", "20"]),
        (json.dumps({"negative_prompt": "x" * 100_000}).encode(), 422, ["negative_prompt"]),
        (b'{"prompt": "a\\ud800b"}', 422, ["JSON"]),  # lone surrogate escape
        (b"\xff\xfe{}", 422, ["JSON"]),
        (b"[" * 100_000 + b"]" * 100_000, 422, ["JSON"]),  # nesting bomb
        (b'"just a string"', 422, ["JSON object"]),
        (b'{"prompt": "<lora:../ink:1>"}', 404, ["../ink"]),
        (b'{"prompt": "<lora:..%2fink:1>"}', 404, []),
        (b'{"prompt": "<lora:%2e%2e%2fhostile-loras%2fink:1>"}', 404, []),
        (b'{"prompt": "<lora:/etc/passwd:1>"}', 404, ["/etc/passwd"]),
        (b'{"prompt": "<lora:ink\\u0000:1>"}', 422, ["prompt", "NUL"]),
        (b'{"prompt": "<lora:caf\\u00e9:1>"}', 404, []),
        (b'{"override_settings": {"sd_model_checkpoint": "../models/tiny-sd1"}}', 404, []),
        (b'{"override_settings": {"sd_model_checkpoint": "/etc/passwd"}}', 404, []),
        (b'{"override_settings": {"sd_model_checkpoint": "tiny-sd1\\u0000.x"}}', 422, ["NUL"]),
    ],
)
def test_bad_requests_get_contract_status_and_message(
    server: Server, raw: bytes, status: int, words: list[str]
) -> None:
    got, _, payload = call(server, "POST", "/txt2img", raw=raw)
    assert got == status, payload
    assert_a1111_error(payload, *words)
    assert (
        str(server.models) not in payload["detail"] and str(server.loras) not in payload["detail"]
    )


def test_absolute_path_of_a_listed_lora_is_not_a_name(server: Server) -> None:
    for name in (str(server.loras / "ink.safetensors"), str(server.loras / "ink")):
        got, _, payload = call(server, "POST", "/txt2img", {"prompt": f"<lora:{name}:1>", **SMALL})
        assert got == 404, payload


def test_unusable_file_is_refused_with_its_reason(server: Server) -> None:
    got, _, payload = call(server, "POST", "/txt2img", {"prompt": "<lora:caf\\xe9>", **SMALL})
    assert got == 400, payload
    assert_a1111_error(payload, "not valid UTF-8")


def test_nul_bytes_are_refused_naming_the_field(server: Server) -> None:
    got, _, payload = call(server, "POST", "/txt2img", {"prompt": "a\x00b", "seed": 1, **SMALL})
    assert got == 422, payload
    assert_a1111_error(payload, "prompt", "NUL")


JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def cheap_or(*valid: Any) -> st.SearchStrategy[Any]:
    """Cheap valid values (so a fuzz example that is valid stays fast) or junk."""
    return st.one_of(st.sampled_from(valid), JUNK)


TXT2IMG_BODIES = st.fixed_dictionaries(
    {},
    optional={
        "prompt": st.one_of(
            st.text(max_size=60),
            st.sampled_from(["<lora:ink:0.5>", "<lora:../x>", "<lora:%2e%2e%2f>", "<lora:"]),
            JUNK,
        ),
        "negative_prompt": cheap_or("", "blurry"),
        "width": cheap_or(64, 72, 63),
        "height": cheap_or(64, 80),
        "steps": cheap_or(1, 2),
        "batch_size": cheap_or(1),
        "n_iter": cheap_or(1),
        "cfg_scale": cheap_or(0, 7.5, 30),
        "seed": cheap_or(-1, 0, 4294967295),
        "sampler_name": cheap_or("Euler", "DPM++ 2M Karras", "Nope"),
        "scheduler": cheap_or("karras", "automatic", "wobbly"),
        "override_settings": cheap_or({}, {"sd_model_checkpoint": "../x"}),
        "send_images": cheap_or(True, False),
        "save_images": cheap_or(True, False),
        "clip_skip": JUNK,
        "made_up_field": JUNK,
    },
)


def test_fuzz_txt2img_never_500_and_touches_no_listed_file(server: Server) -> None:
    watched = (server.models, server.loras)
    before = snapshot(*watched)
    seen: set[int] = set()

    @settings(
        max_examples=40,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(
        body=st.one_of(
            TXT2IMG_BODIES.map(lambda b: {"steps": 1, "width": 64, "height": 64, **b}),
            st.binary(max_size=40).map(lambda raw: ("raw", raw)),
        )
    )
    def run(body: Any) -> None:
        if isinstance(body, tuple):
            status, _, payload = call(server, "POST", "/txt2img", raw=body[1], timeout=60)
        else:
            raw = json.dumps(body, allow_nan=True).encode()
            status, _, payload = call(server, "POST", "/txt2img", raw=raw, timeout=60)
        seen.add(status)
        assert status in (200, 400, 404, 422), payload
        if status != 200:
            assert_a1111_error(payload)

    run()
    assert snapshot(*watched) == before
    assert seen >= {200, 422}, seen
    outputs = server.data / "outputs"
    leftovers = {p for p in server.data.rglob("*") if p.is_file()}
    allowed_roots = (outputs, server.data / "cache", server.log)
    assert all(any(p.is_relative_to(r) for r in allowed_roots) for p in leftovers), leftovers


# ---------------------------------------------------------------- concurrency

SD1_STACKS = [
    "",
    "<lora:ink:0.8>",
    "<lora:glow:-0.5>",
    "<lora:ink:0.5> <lora:glow:0.5>",
    "<lora:warm:1>",
    "<lora:ink:1> <lora:warm:-0.7>",
    "<lora:glow:1.2> <lora:warm:0.3>",
    "<lora:ink:0.3> <lora:glow:0.3> <lora:warm:0.3>",
]


def body_for(index: int, checkpoint: str) -> dict[str, Any]:
    """Client `index`'s request: its own stack (SD1 only) and seed, its checkpoint named."""
    stack = SD1_STACKS[index] if checkpoint == SD1 else ""
    return {
        "prompt": f"a lighthouse {stack}".strip(),
        "seed": 1000 + index,
        "override_settings": {"sd_model_checkpoint": checkpoint},
        **SMALL,
    }


def generate(server: Server, body: dict[str, Any]) -> tuple[int, Any]:
    status, _, payload = call(server, "POST", "/txt2img", body, timeout=300)
    return status, payload


def generate_retrying(server: Server, body: dict[str, Any]) -> tuple[int, Any]:
    """As a polite client: on 503 (model loading, queue full) wait and retry, bounded."""
    deadline = time.monotonic() + 120
    for _ in range(200):
        status, headers, payload = call(server, "POST", "/txt2img", body, timeout=300)
        if status != 503 or time.monotonic() > deadline:
            return status, payload
        assert int(headers["Retry-After"]) > 0
        assert_a1111_error(payload, "loading" if "loading" in payload["detail"] else "queue")
        time.sleep(0.2)
    return status, payload


def run_clients(server: Server, bodies: list[dict[str, Any]]) -> list[tuple[int, Any]]:
    """All bodies at once, one thread each; bounded by a join timeout."""
    results: list[Any] = [None] * len(bodies)
    start = threading.Barrier(len(bodies))

    def client(index: int) -> None:
        start.wait(timeout=30)
        results[index] = generate_retrying(server, bodies[index])

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a client did not finish within 300 s"
    return results


def check_same(result: tuple[int, Any], reference: tuple[int, Any], checkpoint: str) -> None:
    status, payload = result
    assert status == 200, payload
    info = json.loads(payload["info"])
    assert info["sd_model_name"] == Path(checkpoint).stem
    parsed = parse_infotext(info["infotexts"][0])
    assert parsed.params["Model"] == Path(checkpoint).stem, parsed
    expected = json.loads(reference[1]["info"])["infotexts"][0]
    assert info["infotexts"][0] == expected
    assert np.array_equal(
        pixels_of_b64(payload["images"][0]), pixels_of_b64(reference[1]["images"][0])
    )


def test_eight_clients_each_get_their_sequential_reference(server: Server) -> None:
    bodies = [body_for(i, SD1) for i in range(8)]
    references = [generate(server, body) for body in bodies]
    assert len({r[1]["images"][0] for r in references}) == 8  # the stacks really differ
    for result, reference in zip(run_clients(server, bodies), references, strict=True):
        check_same(result, reference, SD1)


def test_checkpoint_flips_never_mix_models(server: Server) -> None:
    checkpoints = [SD1 if i % 2 == 0 else SDXL for i in range(8)]
    bodies = [body_for(i, ckpt) for i, ckpt in enumerate(checkpoints)]
    references = [generate(server, body) for body in bodies]
    done = threading.Event()
    flips: list[int] = []

    def flipper() -> None:
        deadline = time.monotonic() + 240
        for count in range(60):
            if done.is_set() or time.monotonic() > deadline:
                return
            target = (SDXL, SD1)[count % 2]
            status, _, payload = call(server, "POST", "/options", {"sd_model_checkpoint": target})
            assert status == 200, payload
            flips.append(status)
            time.sleep(0.3)  # let generations in between the switches

    thread = threading.Thread(target=flipper, daemon=True)
    thread.start()
    try:
        results = run_clients(server, bodies)
    finally:
        done.set()
        thread.join(timeout=120)
    assert flips, "the flipper never ran"
    for result, reference, checkpoint in zip(results, references, checkpoints, strict=True):
        if result[0] == 200:
            check_same(result, reference, checkpoint)
        else:  # refused (still loading after the retries): a clear message, never a mix
            assert result[0] == 503, result
            assert_a1111_error(result[1], "loading")
    assert sum(r[0] == 200 for r in results) >= 6, [(r[0], r[1].get("detail")) for r in results]


# ---------------------------------------------------------------- exposure


def test_listens_on_loopback_only(server: Server) -> None:
    port = f"{server.port:04X}"
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if local.endswith(f":{port}") and state == "0A":
                listening.append(local.split(":")[0])
    assert listening == ["0100007F"], listening  # 127.0.0.1, and nothing on IPv6


def file_route_status(server: Server, target: str, deprecated: bool = False) -> int:
    route = "gradio_api/file/" if deprecated else "gradio_api/file="
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(server.url + route + target, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        with error:
            return error.code


def test_gradio_file_route_reaches_outputs_only(server: Server) -> None:
    status, _, payload = call(server, "POST", "/txt2img", {"save_images": True, "seed": 5, **SMALL})
    assert status == 200, payload
    (saved,) = (server.data / "outputs").rglob("*-5.png")
    assert file_route_status(server, str(saved)) == 200  # the output folder is served
    project = Path(__file__).resolve().parent.parent
    secrets = [
        server.models / SD1,
        server.models / "tiny-sd1.yaml",
        server.loras / "ink.safetensors",
        Path("/etc/passwd"),
        project / "app.py",
        project / "models" / "README.md",
        server.data / "cache" / "hashes.json",
        server.log,
    ]
    variants = []
    for secret in secrets:
        variants.append(str(secret))
        variants.append(urllib.parse.quote(str(secret), safe=""))
    outputs = server.data / "outputs"
    relative_up = os.path.relpath(server.models / SD1, outputs)
    variants += [
        f"{outputs}/{relative_up}",
        urllib.parse.quote(f"{outputs}/{relative_up}", safe=""),
        f"{outputs}/%2e%2e/%2e%2e/etc/passwd",
        f"{outputs}/..%2f..%2f..%2fetc/passwd",
        f"http://127.0.0.1:{server.port}/sdapi/v1/options",
        "file:///etc/passwd",
    ]
    for variant in variants:
        for deprecated in (False, True):
            got = file_route_status(server, variant, deprecated)
            assert got in (403, 404), (variant, deprecated, got)


def test_hide_paths_keeps_host_paths_out_of_every_reply(server: Server) -> None:
    replies = {}
    for path in ("/sd-models", "/loras", "/options", "/cmd-flags"):
        status, _, payload = call(server, "GET", path)
        assert status == 200, (path, payload)
        replies[path] = json.dumps(payload)
    status, _, payload = call(server, "POST", "/txt2img", {"prompt": "<lora:caf\\xe9>", **SMALL})
    replies["unusable"] = json.dumps(payload)
    for path, text in replies.items():
        for host in (server.models, server.loras, server.data):
            assert str(host) not in text, (path, text)
    _, _, models = call(server, "GET", "/sd-models")
    sd1 = next(m for m in models if m["model_name"] == "tiny-sd1")
    assert sd1["filename"] == SD1 and sd1["config"] == "tiny-sd1.yaml"
    _, _, listed = call(server, "GET", "/loras")
    assert {item["path"] for item in listed} >= {"ink.safetensors", "caf\\xe9.safetensors"}


def test_page_and_config_survive_a_non_utf8_lora(server: Server) -> None:
    import urllib.request

    for path in ("", "config"):
        with urllib.request.urlopen(server.url + path, timeout=30) as response:
            assert response.status == 200
            text = response.read().decode("utf-8")
    assert "ink" in text
