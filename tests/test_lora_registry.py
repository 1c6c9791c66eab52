"""The LoRA kind of the model folders: names, aliases, formats, unusable files, hashes, lookup."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipelines.errors import NotFoundError, UnusableFileError
from pipelines.folders.hashing import HashCache, addnet_hash
from pipelines.folders.loras import trigger_words
from pipelines.folders.registry import ModelFolders
from pipelines.lora.files import read_lora_file


class LoraLibrary:
    """The LoRA kind of a ModelFolders, spelled as these tests use it."""

    def __init__(self, roots: list[Path], hashes: HashCache | None = None) -> None:
        self.folders = ModelFolders({"lora": roots}, hashes or HashCache(None))

    def scan(self) -> list:
        self.folders.scan()
        return self.folders.entries("lora")

    def hash_all(self) -> None:
        self.folders.hash_missing()

    def entries(self) -> list:
        return self.folders.entries("lora")

    def resolve(self, name: str):
        return self.folders.resolve("lora", name)

    def load(self, entry):
        if entry.error:
            raise UnusableFileError(entry.error, field="loras")
        return read_lora_file(entry.path)


def lora_state(
    seed: int, width: int = 32, prefix: str = "lora_te_", context: int | None = None
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    te = f"{prefix}text_model_encoder_layers_0_self_attn_q_proj"
    unet = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    return {
        f"{te}.lora_down.weight": torch.randn(4, width, generator=gen),
        f"{te}.lora_up.weight": torch.randn(width, 4, generator=gen),
        f"{te}.alpha": torch.tensor(2.0),
        f"{unet}.lora_down.weight": torch.randn(8, context or width, generator=gen),
        f"{unet}.lora_up.weight": torch.randn(32, 8, generator=gen),
    }


def save(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    return path


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "loras"
    tags = {"ds1": {"red fox": 30, "forest": 12}, "ds2": {"red fox": 5, "snow": 20}}
    save(
        root / "ink.safetensors",
        lora_state(0, 768),
        {
            "ss_output_name": "InkStyle",
            "ss_tag_frequency": json.dumps(tags),
            "ss_base_model_version": "sd_v1",
        },
    )
    (root / "ink.preview.png").write_bytes(b"\x89PNG fake")
    (root / "ink.json").write_text(
        json.dumps({"activation text": "ink style", "preferred weight": 0.7, "notes": "n"})
    )
    save(root / "styles" / "dup.safetensors", lora_state(1))
    save(root / "old" / "dup.safetensors", lora_state(2))
    save(
        root / "xl" / "big.safetensors",
        lora_state(3, 768, "lora_te1_", 2048),
        {"ss_v2": "True", "sshs_model_hash": "ab" * 32},
    )
    torch.save(lora_state(4), root / "pickled.pt")
    (root / "empty.safetensors").write_bytes(b"")
    whole = save(root / "trunc.safetensors", lora_state(5)).read_bytes()
    (root / "trunc.safetensors").write_bytes(whole[:-10])
    save(
        root / "checkpoint.safetensors",
        {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)},
    )
    peft = root / "my-adapter"
    peft.mkdir()
    (peft / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 4}))
    save(
        peft / "adapter_model.safetensors",
        {
            "base_model.model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 32),
            "base_model.model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(32, 4),
        },
    )
    return root


def test_scan_lists_names_formats_and_facts(folder: Path) -> None:
    library = LoraLibrary([folder], HashCache(None))
    entries = {e.name: e for e in library.scan()}
    assert set(entries) == {
        "ink",
        "styles/dup",
        "old/dup",
        "big",
        "pickled",
        "empty",
        "trunc",
        "checkpoint",
        "my-adapter",
    }
    ink = entries["ink"]
    assert ink.alias == "InkStyle" and ink.format == "kohya" and ink.usable
    assert ink.architecture == "SD1" and ink.ranks == (4, 8) and ink.parts == ("unet", "te")
    assert ink.trigger_words[:3] == ("red fox", "snow", "forest")
    assert ink.preview == folder / "ink.preview.png"
    assert ink.activation_text == "ink style" and ink.preferred_weight == 0.7
    assert ink.metadata["ss_output_name"] == "InkStyle"
    big = entries["big"]
    assert big.architecture == "SDXL" and any("metadata says SD2" in n for n in big.notes)
    assert big.short_hash == "ab" * 6
    assert entries["pickled"].usable and entries["pickled"].format == "kohya"
    assert entries["my-adapter"].format == "peft-folder" and entries["my-adapter"].usable
    assert "empty file" in entries["empty"].error
    assert "truncated" in entries["trunc"].error
    assert "full Stable Diffusion checkpoint" in entries["checkpoint"].error
    assert entries["styles/dup"].usable


def test_lookup_rules(folder: Path) -> None:
    library = LoraLibrary([folder], HashCache(None))
    library.scan()
    assert library.resolve("ink").name == "ink"
    assert library.resolve("InkStyle").name == "ink"
    assert library.resolve("inkstyle").name == "ink"
    assert library.resolve("INK").name == "ink"
    assert library.resolve("old/dup").path == folder / "old" / "dup.safetensors"
    with pytest.raises(UnusableFileError, match="ambiguous.*old/dup.*styles/dup") as caught:
        library.resolve("dup")
    assert caught.value.status == 400
    with pytest.raises(NotFoundError, match="close matches: ink") as missing:
        library.resolve("inx")
    assert missing.value.status == 404


@pytest.mark.parametrize(
    "name", ["../x", "../loras/ink", "/etc/passwd", str(Path("/") / "ink"), "ink\x00", "", ".."]
)
def test_names_only_resolve_to_listed_entries(folder: Path, name: str) -> None:
    library = LoraLibrary([folder], HashCache(None))
    library.scan()
    with pytest.raises(NotFoundError):
        library.resolve(name)


def test_absolute_path_of_a_listed_file_is_not_a_name(folder: Path) -> None:
    library = LoraLibrary([folder], HashCache(None))
    library.scan()
    with pytest.raises(NotFoundError):
        library.resolve(str(folder / "ink.safetensors"))


def test_hashes(folder: Path, tmp_path: Path) -> None:
    path = folder / "ink.safetensors"
    data = path.read_bytes()
    (header_size,) = struct.unpack("<Q", data[:8])
    expected = hashlib.sha256(data[8 + header_size :]).hexdigest()
    assert addnet_hash(path) == expected
    edited = save(tmp_path / "edited.safetensors", lora_state(0, 768), {"ss_output_name": "x"})
    assert addnet_hash(edited) == expected  # metadata edits do not change the LoRA hash
    library = LoraLibrary([folder], HashCache(tmp_path / "hashes.json"))
    library.scan()
    library.hash_all()
    ink = library.resolve("ink")
    assert ink.lora_hash == expected and ink.short_hash == expected[:12]
    assert ink.sha256 == hashlib.sha256(data).hexdigest()
    assert library.resolve("big").lora_hash == "ab" * 32  # sshs_model_hash wins
    again = LoraLibrary([folder], HashCache(tmp_path / "hashes.json"))
    again.scan()
    assert again.resolve("ink").lora_hash == expected  # from the persisted cache


def test_nan_is_unusable_when_loaded(tmp_path: Path) -> None:
    state = lora_state(6)
    state["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"][0, 0] = float(
        "inf"
    )
    save(tmp_path / "loras" / "nan.safetensors", state)
    library = LoraLibrary([tmp_path / "loras"], HashCache(None))
    library.scan()
    with pytest.raises(UnusableFileError, match="NaN or Inf"):
        library.load(library.resolve("nan"))


def test_rescan_sees_added_and_replaced_files(folder: Path) -> None:
    library = LoraLibrary([folder], HashCache(None))
    library.scan()
    with pytest.raises(NotFoundError):
        library.resolve("new")
    save(folder / "new.safetensors", lora_state(7))
    library.scan()
    assert library.resolve("new").usable
    save(folder / "new.safetensors", lora_state(8, 1024))
    library.scan()
    assert library.resolve("new").architecture == "SD2"


def test_trigger_words_tolerate_bad_metadata() -> None:
    assert trigger_words({"ss_tag_frequency": "not json"}) == ()
    assert trigger_words({"ss_tag_frequency": json.dumps({"a": {"x": 1, "y": 3}})}) == ("y", "x")
