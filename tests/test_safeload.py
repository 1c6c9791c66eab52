"""pipelines.safeload: header validation, safe unpickling, and the errors users see."""

from __future__ import annotations

import collections
import io
import json
import os
import random
import struct
import sys
import types
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipelines.errors import UnsafeCheckpointError, UnusableFileError
from pipelines.safeload import (
    MAX_HEADER_BYTES,
    TensorInfo,
    load_pickle,
    load_state_dict,
    read_safetensors_header,
)

LIGHTNING = "pytorch_lightning.callbacks.model_checkpoint"


def _weights() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "down.weight": torch.randn(4, 3, generator=gen),
        "up.weight": torch.randn(3, 4, generator=gen).to(torch.float16),
        "alpha": torch.tensor(4.0),
    }


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype
        assert torch.equal(got[key], tensor), key


def _raw_safetensors(header: object, data: bytes = b"") -> bytes:
    body = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(body)) + body + data


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def _f32(shape: list[int], begin: int, end: int) -> dict[str, object]:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


# --------------------------------------------------------------------------- safetensors


def test_safetensors_round_trip(tmp_path: Path) -> None:
    weights = _weights()
    path = tmp_path / "ink.safetensors"
    save_file(weights, path, metadata={"ss_output_name": "ink", "ss_network_dim": "4"})

    header = read_safetensors_header(path)

    assert header.metadata == {"ss_output_name": "ink", "ss_network_dim": "4"}
    assert header.tensors["down.weight"].dtype == "F32"
    assert header.tensors["down.weight"].shape == (4, 3)
    up = header.tensors["up.weight"]
    assert up == TensorInfo("F16", (3, 4), up.offsets) and up.nbytes == 3 * 4 * 2
    assert header.tensors["alpha"].shape == ()
    assert header.data_offset == 8 + header.header_size
    assert header.data_offset + header.data_size == path.stat().st_size
    assert sum(info.nbytes for info in header.tensors.values()) == header.data_size
    _assert_same(load_state_dict(path), weights)


def test_safetensors_extension_is_case_insensitive(tmp_path: Path) -> None:
    weights = _weights()
    path = tmp_path / "Ink.SafeTensors"
    save_file(weights, path)
    _assert_same(load_state_dict(path), weights)


def test_safetensors_empty_file_of_tensors_is_valid(tmp_path: Path) -> None:
    path = _write(tmp_path / "none.safetensors", _raw_safetensors({"__metadata__": {"a": "b"}}))
    header = read_safetensors_header(path)
    assert header.tensors == {} and header.metadata == {"a": "b"} and header.data_size == 0
    assert load_state_dict(path) == {}


_BAD_HEADERS = [
    ("zero_bytes", b"", "empty file (0 bytes)"),
    ("five_bytes", b"\x10\x00\x00\x00\x00", "too short for a safetensors file: 5 bytes"),
    ("bomb", struct.pack("<Q", 2**63) + b"{}", "over the 100000000-byte limit"),
    ("bomb_just_over_cap", struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", "header bomb"),
    ("past_eof", struct.pack("<Q", 1000) + b"{}", "says 1000 bytes, but only 2 bytes follow"),
    ("invalid_json", _raw_safetensors(b"{not json"), "header is not valid JSON"),
    ("not_utf8", _raw_safetensors(b'{"\xff": 1}'), "header is not valid JSON"),
    ("json_list", _raw_safetensors([1, 2]), "header is JSON but not an object (found list)"),
    ("nan", _raw_safetensors(b'{"__metadata__": {"a": NaN}}'), "non-standard constant NaN"),
    (
        "duplicate_key",
        _raw_safetensors(b'{"a": {}, "a": {}}'),
        "duplicate key 'a'",
    ),
    (
        "metadata_not_strings",
        _raw_safetensors({"__metadata__": {"steps": 5}}),
        "__metadata__ is not an object of strings",
    ),
    ("entry_not_object", _raw_safetensors({"w": [1]}), "tensor 'w': entry is not an object"),
    (
        "unknown_dtype",
        _raw_safetensors({"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}),
        "tensor 'w': unknown dtype 'F128'",
    ),
    (
        "bool_in_shape",
        _raw_safetensors({"w": _f32([True], 0, 4)}, b"\0" * 4),
        "tensor 'w': shape [True] is not a list of sizes",
    ),
    (
        "negative_offset",
        _raw_safetensors({"w": _f32([1], -4, 0)}, b"\0" * 4),
        "data_offsets [-4, 0] are not [begin, end]",
    ),
    (
        "dtype_shape_mismatch",
        _raw_safetensors({"w": _f32([3], 0, 8)}, b"\0" * 8),
        "tensor 'w': F32 x [3] needs 12 bytes, data_offsets [0, 8] give 8",
    ),
    (
        "gap",
        _raw_safetensors({"w": _f32([1], 4, 8)}, b"\0" * 8),
        "tensor 'w': data_offsets [4, 8] leave a gap of 4 bytes after offset 0",
    ),
    (
        "overlap",
        _raw_safetensors({"a": _f32([2], 0, 8), "b": _f32([1], 4, 8)}, b"\0" * 8),
        "tensor 'b': data_offsets [4, 8] overlap the previous tensor, which ends at 8",
    ),
    (
        "offsets_past_end",
        _raw_safetensors({"w": _f32([4], 0, 16)}, b"\0" * 8),
        "truncated: header says 16 bytes of tensor data, file has 8",
    ),
    (
        "trailing_bytes",
        _raw_safetensors({"w": _f32([1], 0, 4)}, b"\0" * 6),
        "2 unexpected bytes after the tensor data (header says 4 bytes of tensor data, file has 6)",
    ),
]


@pytest.mark.parametrize(
    ("content", "message"),
    [case[1:] for case in _BAD_HEADERS],
    ids=[case[0] for case in _BAD_HEADERS],
)
def test_bad_safetensors_header_is_refused_precisely(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = _write(tmp_path / "bad.safetensors", content)
    with pytest.raises(UnusableFileError) as info:
        read_safetensors_header(path)
    assert info.value.message.startswith("bad.safetensors: ")
    assert message in info.value.message
    # load_state_dict validates first, so the loader refuses with the same sentence.
    with pytest.raises(UnusableFileError, match="bad.safetensors") as loaded:
        load_state_dict(path)
    assert loaded.value.message == info.value.message


def test_truncated_safetensors_at_each_cut_point(tmp_path: Path) -> None:
    full = tmp_path / "full.safetensors"
    save_file(_weights(), full)
    raw = full.read_bytes()
    header = read_safetensors_header(full)
    start, total = header.data_offset, header.data_size
    cuts = {
        0: "empty file",
        4: "too short",
        8: f"says {header.header_size} bytes, but only 0 bytes follow",
        8 + header.header_size // 2: "bytes follow it (truncated, or not a safetensors file)",
        start: f"truncated: header says {total} bytes of tensor data, file has 0",
        start + total // 2: f"header says {total} bytes of tensor data, file has {total // 2}",
        len(raw) - 1: f"header says {total} bytes of tensor data, file has {total - 1}",
    }
    for cut, message in cuts.items():
        path = _write(tmp_path / f"cut{cut}.safetensors", raw[:cut])
        with pytest.raises(UnusableFileError, match=f"cut{cut}.safetensors") as info:
            load_state_dict(path)
        assert message in info.value.message, cut


def test_random_bytes_named_safetensors(tmp_path: Path) -> None:
    path = _write(tmp_path / "noise.safetensors", _random_bytes(4096))
    with pytest.raises(UnusableFileError, match="noise.safetensors: header length field"):
        read_safetensors_header(path)


def test_missing_and_directory_paths_are_unusable(tmp_path: Path) -> None:
    with pytest.raises(UnusableFileError, match="gone.safetensors: cannot be read"):
        read_safetensors_header(tmp_path / "gone.safetensors")
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(UnusableFileError, match="dir.safetensors: cannot be read"):
        load_state_dict(tmp_path / "dir.safetensors")
    with pytest.raises(UnusableFileError, match="gone.ckpt: cannot be read"):
        load_state_dict(tmp_path / "gone.ckpt")


# --------------------------------------------------------------------------- pickle


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize("name", ["lora.pt", "model.ckpt", "LORA.PTH", "pytorch_model.bin"])
def test_plain_torch_save_loads(tmp_path: Path, name: str, mmap: bool) -> None:
    weights = _weights()
    torch.save(weights, tmp_path / name)
    _assert_same(load_state_dict(tmp_path / name, mmap=mmap), weights)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_zip_checkpoints_are_memory_mapped(tmp_path: Path) -> None:
    path = tmp_path / "mapped.ckpt"
    torch.save({"w": torch.ones(256, 256)}, path)

    def backing_file(tensor: torch.Tensor) -> str | None:
        for line in Path("/proc/self/maps").read_text().splitlines():
            fields = line.split(maxsplit=5)
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= tensor.data_ptr() < high:
                return fields[5] if len(fields) == 6 else None
        return None

    assert backing_file(load_state_dict(path)["w"]) == str(path)
    assert backing_file(load_state_dict(path, mmap=False)["w"]) != str(path)


def test_legacy_non_zip_format_loads(tmp_path: Path) -> None:
    weights = _weights()
    path = tmp_path / "old.pt"
    torch.save(weights, path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    _assert_same(load_state_dict(path), weights)


def test_parameters_come_back_as_plain_tensors(tmp_path: Path) -> None:
    path = tmp_path / "params.pt"
    torch.save({"w": torch.nn.Parameter(torch.ones(2))}, path)
    state = load_state_dict(path)
    assert not state["w"].requires_grad and torch.equal(state["w"], torch.ones(2))


def test_old_checkpoint_with_nested_state_dict_and_numpy_values(tmp_path: Path) -> None:
    weights = _weights()
    checkpoint = collections.OrderedDict(
        epoch=np.int64(6),
        global_step=np.int64(840000),
        lr=np.float64(1e-4),
        history=np.arange(3, dtype=np.float32),
        state_dict=collections.OrderedDict(weights),
    )
    path = tmp_path / "sd-v1-x.ckpt"
    torch.save(checkpoint, path)

    _assert_same(load_state_dict(path), weights)
    whole = load_pickle(path)
    assert isinstance(whole, dict) and whole["global_step"] == 840000
    assert np.array_equal(whole["history"], np.arange(3, dtype=np.float32))


def test_codecs_encode_pickle_loads(tmp_path: Path) -> None:
    # Protocol 2 (torch.save's default) has no bytes opcode: bytes, numpy arrays and numpy
    # scalars are written as _codecs.encode(str, "latin1") calls.
    path = tmp_path / "codecs.pt"
    torch.save({"w": torch.ones(2), "blob": b"\x00\xff", "arr": np.ones(2)}, path)
    with zipfile.ZipFile(path) as archive:
        pkl = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    assert b"c_codecs\nencode\n" in pkl

    assert load_pickle(path)["blob"] == b"\x00\xff"  # type: ignore[index]
    _assert_same(load_state_dict(path), {"w": torch.ones(2)})


def test_pre_numpy2_module_paths_load(tmp_path: Path) -> None:
    # Checkpoints written under numpy 1.x name numpy.core.multiarray, not numpy._core.
    # The legacy stream is a run of plain pickles, so the GLOBAL text can be rewritten.
    buffer = io.BytesIO()
    torch.save(
        {"state_dict": _weights(), "step": np.int64(3), "arr": np.arange(2)},
        buffer,
        _use_new_zipfile_serialization=False,
    )
    raw = buffer.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert b"cnumpy.core.multiarray\nscalar\n" in raw
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw
    path = _write(tmp_path / "numpy1.ckpt", raw)

    _assert_same(load_state_dict(path), _weights())


def _save_with_fake_lightning(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """Pickle a Lightning ModelCheckpoint the way old checkpoints do, without Lightning."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", LIGHTNING]

    class ModelCheckpoint:
        def __init__(self) -> None:
            self.monitor = "val/loss_simple_ema"
            self.best_model_score = torch.tensor(0.25)

    ModelCheckpoint.__module__ = LIGHTNING
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    with monkeypatch.context() as patch:
        for name in names:
            patch.setitem(sys.modules, name, types.ModuleType(name))
        sys.modules[LIGHTNING].ModelCheckpoint = ModelCheckpoint  # type: ignore[attr-defined]
        torch.save(
            {
                "state_dict": _weights(),
                "global_step": 470000,
                # Old Lightning keyed callback state by the class; some keep an instance.
                "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.25)}},
                "callback_objects": [ModelCheckpoint()],
            },
            path,
        )
    assert "pytorch_lightning" not in sys.modules


def test_lightning_model_checkpoint_callback_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "sd-v1-4.ckpt"
    _save_with_fake_lightning(monkeypatch, path)
    with zipfile.ZipFile(path) as archive:
        pkl = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    assert f"c{LIGHTNING}\nModelCheckpoint\n".encode() in pkl

    _assert_same(load_state_dict(path), _weights())
    whole = load_pickle(path)
    assert isinstance(whole, dict)
    (stand_in,) = whole["callback_objects"]
    assert stand_in.monitor == "val/loss_simple_ema"  # state kept, no Lightning code run
    assert "pytorch_lightning" not in sys.modules


def test_textual_inversion_parameter_dict_loads(tmp_path: Path) -> None:
    # A1111 embeddings keep their vectors in a ParameterDict under string_to_param.
    vectors = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "emb.pt"
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors)}),
            "name": "emb",
            "step": 500,
        },
        path,
    )
    whole = load_pickle(path)
    assert isinstance(whole, dict)
    assert torch.equal(whole["string_to_param"]["*"], vectors)


def test_non_dict_checkpoint_is_unusable(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.ones(1)], path)
    with pytest.raises(UnusableFileError, match="list.pt: holds a list, not a dict of weights"):
        load_state_dict(path)


def test_loading_leaves_torch_safe_globals_as_found(tmp_path: Path) -> None:
    before = torch.serialization.get_safe_globals()
    path = tmp_path / "x.pt"
    torch.save({"step": np.int64(1), "w": torch.ones(1)}, path)
    load_state_dict(path)
    # As a multiset: torch itself may re-register its own entries in another order.
    after = torch.serialization.get_safe_globals()
    assert sorted(map(repr, after)) == sorted(map(repr, before))


class _System:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


class _Eval(_System):
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return eval, (f"__import__('pathlib').Path({str(self.marker)!r}).touch()",)


class _Open(_System):
    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize(
    ("payload", "global_name"),
    [
        (_System, f"{os.system.__module__}.system"),
        (_Eval, "builtins.eval"),
        (_Open, f"{open.__module__}.open"),
    ],
    ids=["os.system", "eval", "open"],
)
def test_malicious_pickle_is_refused_and_never_run(
    tmp_path: Path, payload: type[_System], global_name: str, legacy: bool
) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save(
        {"state_dict": _weights(), "x": payload(marker)},
        path,
        _use_new_zipfile_serialization=not legacy,
    )
    with pytest.raises(UnsafeCheckpointError) as info:
        load_state_dict(path)
    message = info.value.message
    assert message.startswith("evil.ckpt: refused")
    assert global_name in message
    assert ".safetensors" in message
    assert not marker.exists()


def test_unsafe_refusal_lists_every_blocking_global(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "two.pt"
    torch.save([_Eval(marker), _Open(marker)], path)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_pickle(path)
    assert "builtins.eval" in info.value.message
    assert f"also: {open.__module__}.open" in info.value.message
    assert not marker.exists()


def _assert_unusable(path: Path, message: str) -> None:
    with pytest.raises(UnusableFileError) as info:
        load_state_dict(path)
    assert type(info.value) is UnusableFileError  # not mistaken for a malicious file
    assert info.value.message.startswith(f"{path.name}: ")
    assert message in info.value.message


def test_truncated_ckpt_at_several_cut_points(tmp_path: Path) -> None:
    full = tmp_path / "full.ckpt"
    torch.save(_weights(), full)
    raw = full.read_bytes()
    for cut in (2, 100, len(raw) // 2, len(raw) - 1):
        path = _write(tmp_path / f"cut{cut}.ckpt", raw[:cut])
        expected = "not a valid torch checkpoint" if cut < 4 else "damaged or truncated zip"
        _assert_unusable(path, expected)


def test_truncated_legacy_checkpoint(tmp_path: Path) -> None:
    full = tmp_path / "full.pt"
    torch.save(_weights(), full, _use_new_zipfile_serialization=False)
    raw = full.read_bytes()
    for cut in (len(raw) // 3, len(raw) - 1):
        _assert_unusable(_write(tmp_path / f"cut{cut}.pt", raw[:cut]), "")


def test_zero_byte_pt(tmp_path: Path) -> None:
    _assert_unusable(_write(tmp_path / "empty.pt", b""), "empty.pt: empty file (0 bytes)")


def test_random_bytes_pth(tmp_path: Path) -> None:
    _assert_unusable(_write(tmp_path / "noise.pth", _random_bytes(4096)), "not a valid torch")


def test_zip_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes.ckpt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes/readme.txt", "hello")
    _assert_unusable(path, "zip archive without data.pkl")


def test_torchscript_archive_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("scripted/data.pkl", b"")
        archive.writestr("scripted/constants.pkl", b"")
    _assert_unusable(path, "a TorchScript program, not a checkpoint of weights")


@pytest.mark.parametrize("name", ["weights.txt", "model", "model.safetensors.tmp", "x.pkl"])
def test_unknown_extension_is_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    torch.save(_weights(), path)
    _assert_unusable(path, ": not a weights format we read (allowed: .bin, .ckpt, .pt, .pth,")


def test_legacy_file_cut_inside_a_global_is_truncated_not_unsafe(tmp_path: Path) -> None:
    # torch reads the GLOBAL "torch\nFloatStorage\n" cut to "torch\nFlo" as "torch.Fl".
    buffer = io.BytesIO()
    torch.save(_weights(), buffer, _use_new_zipfile_serialization=False)
    raw = buffer.getvalue()
    at = raw.index(b"torch\nFloatStorage\n")
    for cut in (at + 3, at + 6, at + 9, at + len(b"torch\nFloatStorage")):
        path = _write(tmp_path / f"cut{cut}.pt", raw[:cut])
        _assert_unusable(path, "truncated: the pickle stream ends inside an instruction")


def test_concurrent_loads_do_not_strip_each_others_globals(tmp_path: Path) -> None:
    # torch's allowlist is process-wide; each load adds and removes the extras.
    path = tmp_path / "numpy.ckpt"
    torch.save({"state_dict": _weights(), "step": np.int64(1), "arr": np.ones(3)}, path)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: load_state_dict(path, mmap=False), range(16)))
    for state in results:
        _assert_same(state, _weights())
