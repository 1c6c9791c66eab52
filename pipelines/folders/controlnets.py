"""The ControlNet kind: `models/ControlNet/` (and `--controlnet-dir`), as sd-webui-controlnet
lists it.

What is listed: single files (`.safetensors`, `.pth`, `.pt`, `.ckpt`, `.bin`) and diffusers
folders (a `config.json` beside the weights). Each is named as sd-webui-controlnet names
it, `stem [hash]`, where the hash is A1111's old 8-digit `model_hash` (sha256 of the 64 KiB
at offset 1 MiB), cheap enough to compute while scanning.

What is usable: ControlNets in the original (LDM, `input_hint_block.*`, with or without the
`control_model.` prefix) or the diffusers layout (`controlnet_cond_embedding.*`), for SD1,
SD2 and SDXL, and plain, Plus, Full-face and FaceID IP-Adapters (layout "ipadapter",
`pipelines.controlnet.ipadapter`). Files sd-webui-controlnet also runs but this project does
not (Control-LoRA, ControlNet-LLLite, T2I-Adapter, ControlNet Union, IP-Adapter FaceID Plus,
difference ControlNets, SparseCtrl) are listed with the reason they are
unusable, so a request naming one gets that reason rather than "unknown model". The family
comes from the header (SDXL: an `add_embedding` / `label_emb`; SD2: cross-attention width
1024; SD1: 768); a pickle's family is learnt when it is loaded; a width the three families
do not have (a test model) leaves it None, and the engine judges the fit against the
model's UNet then.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat as stat_kinds
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from pipelines.errors import UnusableFileError
from pipelines.folders.hashing import HashCache
from pipelines.safeload import load_pickle, load_state_dict, read_safetensors_header

CONTROLNET_EXTENSIONS = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
CONTROLNET_SUBFOLDER = "ControlNet"
ANNOTATORS_SUBFOLDER = "annotators"
"""Preprocessor weights (`models/ControlNet/annotators/<name>/`): never listed as models."""
LDM_PREFIX = "control_model."
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
FAMILY_WIDTHS = {768: "SD1", 1024: "SD2", 2048: "SDXL"}
IPADAPTER_LAYOUT = "ipadapter"


@dataclass(frozen=True)
class ControlNetEntry:
    """One listed ControlNet model; `error` says why it cannot be used."""

    relpath: str
    path: Path
    size: int
    mtime_ns: int
    kind: str = "single"  # or "diffusers" (a folder)
    layout: str | None = None  # "ldm", "diffusers", "ipadapter"; None: a pickle not read yet
    family: str | None = None
    model_hash: str | None = None  # A1111's old 8-digit hash
    error: str | None = None

    @property
    def key(self) -> str:
        return self.relpath

    @property
    def stem(self) -> str:
        """The file name without extension (a folder: its name)."""
        name = Path(self.relpath).name
        return name if self.kind == "diffusers" else name.rsplit(".", 1)[0]

    @property
    def title(self) -> str:
        """sd-webui-controlnet's model name: `stem [hash]`."""
        return f"{self.stem} [{self.model_hash}]" if self.model_hash else self.stem

    @property
    def name(self) -> str:
        return self.title


@dataclass(frozen=True)
class ControlNetFacts:
    layout: str | None = None
    family: str | None = None
    model_hash: str | None = None
    error: str | None = None


def old_model_hash(path: Path) -> str:
    """A1111's `model_hash`: sha256 of 64 KiB read at offset 1 MiB, 8 hex digits."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        handle.seek(0x100000)
        digest.update(handle.read(0x10000))
    return digest.hexdigest()[:8]


def weights_file(folder: Path) -> Path | None:
    """A diffusers folder's weights file, if it has one."""
    return next((folder / n for n in DIFFUSERS_WEIGHTS if (folder / n).is_file()), None)


UNSUPPORTED_CLASSES = {
    "T2IAdapter": "a T2I-Adapter",
    "MultiAdapter": "a T2I-Adapter",
    "ControlNetXSAdapter": "a ControlNet-XS",
    "ControlNetUnionModel": "a ControlNet Union (ControlNet++)",
    "SparseControlNetModel": "a SparseCtrl ControlNet",
}
UNSUPPORTED_NOTE = "sd-webui-controlnet runs it; lorastack runs only ControlNets"


def _unsupported(name: str, what: str) -> ControlNetFacts:
    return ControlNetFacts(error=f"{name}: {what}, not a ControlNet ({UNSUPPORTED_NOTE})")


def facts_from_shapes(name: str, shapes: Mapping[str, tuple[int, ...]]) -> ControlNetFacts:
    """What the tensor names and shapes say: layout and family, or why it is unusable."""
    keys = {key.removeprefix(LDM_PREFIX): shape for key, shape in shapes.items()}
    if any(key.startswith("model.diffusion_model.") for key in keys):
        return ControlNetFacts(error=f"{name}: a full checkpoint, not a ControlNet")
    if "lora_controlnet" in keys:
        return _unsupported(name, "a Control-LoRA (Stability's LoRA-compressed ControlNet)")
    if any("lllite" in key for key in keys):
        return _unsupported(name, "a ControlNet-LLLite (kohya)")
    if "control_add_embedding.linear_1.bias" in keys or "task_embedding" in keys:
        return _unsupported(name, "a ControlNet Union (xinsir's ControlNet++)")
    if any(k.startswith("image_proj.") for k in keys) and any(
        k.startswith("ip_adapter.") for k in keys
    ):
        return _ipadapter(name, keys)
    if any("motion_modules" in key for key in keys):
        return _unsupported(name, "a SparseCtrl ControlNet")
    if "difference" in keys:
        return ControlNetFacts(
            error=f"{name}: a difference ControlNet (its weights are added to its base "
            "model's, which this project does not do); use the full ControlNet"
        )
    adapter = any(k.startswith(("adapter.body.", "body.0.")) for k in keys)
    if adapter and "input_hint_block.0.weight" not in keys:
        return _unsupported(name, "a T2I-Adapter")
    if "input_hint_block.0.weight" in keys:
        sdxl = any(key.startswith("label_emb.") for key in keys)
        return ControlNetFacts(layout="ldm", family=_family(keys, sdxl))
    if "controlnet_cond_embedding.conv_in.weight" in keys:
        sdxl = any(key.startswith("add_embedding.") for key in keys)
        return ControlNetFacts(layout="diffusers", family=_family(keys, sdxl))
    return ControlNetFacts(
        error=f"{name}: not a ControlNet (no input_hint_block or controlnet_cond_embedding tensors)"
    )


IPADAPTER_KINDS = {
    "plain": ("proj.weight", "proj.bias", "norm.weight", "norm.bias"),
    "plus": ("latents", "proj_in.weight", "proj_out.weight", "norm_out.weight"),
    "full": (*(f"proj.{i}.{part}" for i in (0, 2, 3) for part in ("weight", "bias")),),
    "faceid": (
        *(f"proj.{i}.{part}" for i in (0, 2) for part in ("weight", "bias")),
        "norm.weight",
        "norm.bias",
    ),
}
"""The `image_proj.*` tensors each usable IP-Adapter kind has (a Plus adapter's Resampler
also has its `layers.*`; these name its shapes)."""


def ipadapter_kind(keys: Collection[str]) -> str:
    """Which IP-Adapter a file's `image_proj` tensors make (sd-webui-controlnet's
    `IPAdapterModel.load` tells them apart the same way): "plain" (a linear layer on the
    image embedding), "plus" (a Resampler on the encoder's hidden states: `latents`), "full"
    (Full-face: an MLP on every hidden state: `proj.3`, its layer norm), "faceid" (an MLP on
    insightface's face embedding, then `norm`) or "faceid_plus" (`perceiver_resampler`)."""
    if any(k.startswith("image_proj.perceiver_resampler.") for k in keys):
        return "faceid_plus"
    if "image_proj.proj.3.weight" in keys:
        return "full"
    if "image_proj.proj.0.weight" in keys:
        return "faceid"
    if "image_proj.latents" in keys:
        return "plus"
    return "plain"


def _ipadapter(name: str, keys: Mapping[str, tuple[int, ...]]) -> ControlNetFacts:
    """A plain, Plus, Full-face or FaceID IP-Adapter with all of its projection's tensors is
    usable (FaceID also needs insightface, judged when listing); its family comes from the
    width its image keys take (the UNet's cross-attention width). FaceID Plus (insightface
    embeddings and CLIP hidden states together) is not."""
    kind = ipadapter_kind(keys)
    if kind == "faceid_plus":
        return ControlNetFacts(
            error=f"{name}: an IP-Adapter FaceID Plus: it reads insightface face embeddings "
            "and CLIP hidden states together, which lorastack does not run (it runs plain "
            "FaceID, Full-face, Plus and plain IP-Adapters)"
        )
    label = {"plain": "", "plus": " Plus", "full": " Full-face", "faceid": " FaceID"}[kind]
    wanted = [f"image_proj.{part}" for part in IPADAPTER_KINDS[kind]]
    key = keys.get("ip_adapter.1.to_k_ip.weight")
    missing = [k for k in wanted if k not in keys]
    if key is None or len(key) != 2:
        missing.append("ip_adapter.1.to_k_ip.weight")
    if missing or key is None:
        return ControlNetFacts(
            error=f"{name}: an IP-Adapter{label} without all of its tensors "
            f"({', '.join(missing)} missing or not a matrix)"
        )
    return ControlNetFacts(layout=IPADAPTER_LAYOUT, family=FAMILY_WIDTHS.get(key[1]))


ADAPTER_PARTS = ("image_proj", "ip_adapter")
"""The two dicts of an IP-Adapter pickle (h94's `.bin` files, FaceID's among them)."""


def file_state(path: Path) -> dict[str, Any]:
    """A single file's tensors by name (`safeload.load_state_dict`); an IP-Adapter pickle's
    two dicts (`{"image_proj": {...}, "ip_adapter": {...}}`, which that drops) flattened
    to the `image_proj.*`, `ip_adapter.*` keys its safetensors form has."""
    state = load_state_dict(path)
    if state or path.suffix.lower() == ".safetensors":
        return state
    loaded = load_pickle(path)
    if not isinstance(loaded, dict) or not all(
        isinstance(loaded.get(part), dict) for part in ADAPTER_PARTS
    ):
        return state
    return {
        f"{part}.{key}": value
        for part in ADAPTER_PARTS
        for key, value in loaded[part].items()
        if isinstance(key, str) and hasattr(value, "shape")
    }


@lru_cache(maxsize=64)
def _pickle_shapes(path: str, size: int, mtime_ns: int) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in file_state(Path(path)).items()}


def file_shapes(entry: ControlNetEntry) -> dict[str, tuple[int, ...]]:
    """A listed single file's tensor shapes: the safetensors header, or a pickle read with
    `weights_only` (mapped, not copied), once per file version."""
    if entry.path.suffix.lower() == ".safetensors":
        return {k: v.shape for k, v in read_safetensors_header(entry.path).tensors.items()}
    return _pickle_shapes(str(entry.path), entry.size, entry.mtime_ns)


def _family(keys: Mapping[str, tuple[int, ...]], sdxl: bool) -> str | None:
    if sdxl:
        return "SDXL"
    for key, shape in keys.items():
        if key.endswith("attn2.to_k.weight") and len(shape) == 2:
            return FAMILY_WIDTHS.get(shape[1])
    return None


def facts_from_config(name: str, config: Mapping[str, object]) -> ControlNetFacts:
    """A diffusers folder's config: a ControlNetModel's, and its family."""
    cls = str(config.get("_class_name", ""))
    if cls in UNSUPPORTED_CLASSES:
        return _unsupported(name, UNSUPPORTED_CLASSES[cls])
    if cls != "ControlNetModel":
        return ControlNetFacts(error=f"{name}: config.json is not a ControlNetModel's ({cls})")
    if config.get("addition_embed_type") == "text_time":
        family: str | None = "SDXL"
    else:
        width = config.get("cross_attention_dim")
        family = FAMILY_WIDTHS.get(width) if isinstance(width, int) else None
    return ControlNetFacts(layout="diffusers", family=family)


def classify_controlnet(path: Path) -> ControlNetFacts:
    """Layout and family from the safetensors header or the diffusers config; pickles are
    read when first used (their facts are learnt then)."""
    if path.is_dir():
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            return ControlNetFacts(error=f"{path.name}: unreadable config.json ({error})")
        if not isinstance(config, dict):
            return ControlNetFacts(error=f"{path.name}: config.json is not an object")
        weights = weights_file(path)
        if weights is None:
            return ControlNetFacts(error=f"{path.name}: no diffusion_pytorch_model weights")
        facts = facts_from_config(path.name, config)
        return ControlNetFacts(facts.layout, facts.family, old_model_hash(weights), facts.error)
    if path.stat().st_size == 0:
        return ControlNetFacts(error=f"{path.name}: empty file (0 bytes)")
    model_hash = old_model_hash(path)
    if path.suffix.lower() != ".safetensors":
        return ControlNetFacts(model_hash=model_hash)
    try:
        header = read_safetensors_header(path)
    except UnusableFileError as error:
        return ControlNetFacts(model_hash=model_hash, error=error.message)
    facts = facts_from_shapes(path.name, {k: v.shape for k, v in header.tensors.items()})
    return ControlNetFacts(facts.layout, facts.family, model_hash, facts.error)


def controlnet_entry(
    root: Path,
    path: Path,
    relpath: str,
    name: str,
    facts: ControlNetFacts,
    stat: os.stat_result,
    hashes: HashCache,
) -> ControlNetEntry:
    folder = stat_kinds.S_ISDIR(stat.st_mode)
    return ControlNetEntry(
        relpath=relpath,
        path=path,
        size=stat.st_size,
        mtime_ns=stat.st_mtime_ns,
        kind="diffusers" if folder else "single",
        layout=facts.layout,
        family=facts.family,
        model_hash=facts.model_hash,
        error=facts.error,
    )


def controlnet_matchers(entry: ControlNetEntry, wanted: str) -> tuple[bool, ...]:
    """sd-webui-controlnet's lookup, in tiers: the exact title (`stem [hash]`) or relative
    path, the stem in any case, the stem of a title whose hash differs, then a part of the
    stem (sd-webui-controlnet takes the shortest; here several are an ambiguity error)."""
    low = wanted.strip().lower()
    bare = low.rsplit(" [", 1)[0] if low.endswith("]") else low
    stem = entry.stem.lower()
    return (
        wanted in (entry.title, entry.relpath),
        low in (stem, entry.title.lower(), entry.relpath.lower()),
        bare == stem,
        bool(bare) and bare in stem,
    )
