"""LoRA files of every common format, merged exactly into the live pipeline's weights.

We own the merge path instead of diffusers' `load_lora_weights`, which refuses LyCORIS
LoHa/LoKr files and silently drops DoRA magnitudes. A file is parsed once into groups (one
per target module, model-independent and cached), resolved against a pipeline's module
names, and merged as `base + sum(deltas)` computed in fp32 from a CPU backup of the base
weight (as A1111 does): merged weights cost nothing per step, and removing every LoRA
restores the base model bit-exactly instead of trusting fuse/unfuse arithmetic.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch

from pipelines.architecture import Architecture
from pipelines.errors import UnusableFileError
from pipelines.safeload import load_state_dict, read_safetensors_header

if TYPE_CHECKING:
    from pipelines.lora_registry import LoraEntry

log = logging.getLogger(__name__)

COMPONENTS: tuple[str, ...] = ("unet", "text_encoder", "text_encoder_2")
FAMILIES: tuple[str, ...] = ("SD1", "SD2", "SDXL")
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")

# Key suffix -> part name. Longest suffixes first, so `.lora_down.weight` wins over `.weight`.
_SUFFIXES: tuple[tuple[str, str], ...] = tuple(
    sorted(
        {
            ".lora_down.weight": "down",
            ".lora_up.weight": "up",
            ".lora_mid.weight": "mid",
            ".lora_A.weight": "down",
            ".lora_B.weight": "up",
            ".lora_A.default.weight": "down",
            ".lora_B.default.weight": "up",
            ".lora.down.weight": "down",
            ".lora.up.weight": "up",
            ".lora_linear_layer.down.weight": "down",
            ".lora_linear_layer.up.weight": "up",
            ".lora_magnitude_vector": "magnitude",
            ".lora_magnitude_vector.weight": "magnitude",
            ".lora_magnitude_vector.default.weight": "magnitude",
            ".dora_scale": "dora_scale",
            ".alpha": "alpha",
            ".scale": "scale",
            ".wd_for_diff": "wd_for_diff",
            **{f".hada_{p}": f"hada_{p}" for p in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
            **{
                f".lokr_{p}": f"lokr_{p}"
                for p in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")
            },
        }.items(),
        key=lambda item: -len(item[0]),
    )
)
# Parts of formats we recognise but do not merge (IA3, OFT, GLoRA, full diffs, biases).
_UNSUPPORTED_MARKERS = ("on_input", "oft_", "a1.weight", "b1.weight", ".diff", ".diff_b", ".w_norm")
_OLD_PROCESSOR = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_PREFIXES: tuple[tuple[str, str | None, str], ...] = (
    # (key prefix, component or None = "find it", naming style)
    ("lora_unet_", "unet", "kohya"),
    ("lora_te1_", "text_encoder", "kohya"),
    ("lora_te2_", "text_encoder_2", "kohya"),
    ("lora_te_", "text_encoder", "kohya"),
    ("lycoris_", None, "kohya"),
    ("unet.", "unet", "dotted"),
    ("text_encoder_2.", "text_encoder_2", "dotted"),
    ("text_encoder.", "text_encoder", "dotted"),
    ("base_model.model.", None, "dotted"),
)


# --------------------------------------------------------------------------- parsing


T = TypeVar("T")


@dataclass(frozen=True)
class Group(Generic[T]):
    """The parts of one target module in a file. `component` None: to be found by name.

    `name` is the module path as the file spells it, with `.` turned into `_`, so kohya,
    lycoris and diffusers/PEFT spellings all match the same aliases.
    """

    key: str
    component: str | None
    name: str
    parts: dict[str, T]

    @property
    def kind(self) -> str:
        """ "lora", "loha", "lokr" or "unsupported" (IA3, OFT, missing halves...)."""
        keys = set(self.parts)
        if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= keys:
            return "loha"
        has_w1 = "lokr_w1" in keys or {"lokr_w1_a", "lokr_w1_b"} <= keys
        has_w2 = "lokr_w2" in keys or {"lokr_w2_a", "lokr_w2_b"} <= keys
        if has_w1 and has_w2:
            return "lokr"
        if {"up", "down"} <= keys:
            return "lora"
        return "unsupported"


def _split_key(key: str) -> tuple[str, str] | None:
    """Full key -> (module part, part name), or None for keys no format we know uses."""
    old = _OLD_PROCESSOR.match(key)
    if old:
        module = f"{old.group(1)}.{old.group(2)}" + (".0" if old.group(2) == "to_out" else "")
        return module, old.group(3)
    for suffix, part in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def _locate(module: str) -> tuple[str | None, str]:
    """Module part of a key -> (component or None, underscored module name)."""
    for prefix, component, _style in _PREFIXES:
        if module.startswith(prefix):
            return component, module[len(prefix) :].replace(".", "_")
    return None, module.replace(".", "_")


def group_keys(values: Mapping[str, T]) -> tuple[dict[str, Group[T]], list[str]]:
    """Group a state dict (tensors, or shapes from a header) by target module.

    Returns the groups and the keys that belong to no format we merge.
    """
    grouped: dict[str, dict[str, T]] = {}
    unknown: list[str] = []
    for key, value in values.items():
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        module, part = split
        grouped.setdefault(module, {})[part] = value
    groups: dict[str, Group[T]] = {}
    for module, parts in grouped.items():
        component, name = _locate(module)
        groups[module] = Group(module, component, name, parts)
    return groups, unknown


def file_format(groups: Mapping[str, Group[Any]], folder: bool = False) -> str:
    """A short label of the file's format, for the registry and messages."""
    kinds = {g.kind for g in groups.values()} - {"unsupported"}
    dora = any({"dora_scale", "magnitude"} & set(g.parts) for g in groups.values())
    if folder:
        label = "peft-folder"
    elif any(g.key.startswith(("lora_", "lycoris_")) for g in groups.values()):
        label = "kohya"
    else:
        label = "diffusers"
    if "loha" in kinds:
        label += "+loha"
    if "lokr" in kinds:
        label += "+lokr"
    return label + ("+dora" if dora else "")


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def group_rank(group: Group[Any]) -> int | None:
    """The rank A1111 divides alpha by: rows of lora_down / hada_w1_b / a low-rank LoKr b."""
    for part in ("down", "hada_w1_b", "lokr_w1_b", "lokr_w2_b"):
        if part in group.parts:
            return _shape(group.parts[part])[0]
    return None


def parts_touched(groups: Mapping[str, Group[Any]]) -> tuple[str, ...]:
    """Which pipeline parts a file touches: "unet", "te" (SD1/2), "te1"/"te2" (SDXL)."""
    found: set[str] = set()
    for group in groups.values():
        if (
            group.key.startswith("lora_te1_")
            or group.component == "text_encoder"
            and any(g.component == "text_encoder_2" for g in groups.values())
        ):
            found.add("te1")
        elif group.component == "text_encoder_2":
            found.add("te2")
        elif group.component == "text_encoder":
            found.add("te")
        elif group.component == "unet" or "blocks" in group.name or "conv_" in group.name:
            found.add("unet")
        elif "text_model" in group.name or "layers" in group.name:
            found.add("te")
        else:
            found.add("unet")
    return tuple(p for p in ("unet", "te", "te1", "te2") if p in found)


# --------------------------------------------------------------------------- architecture


@dataclass(frozen=True)
class LoraArchitecture:
    """The families a file can belong to, from keys and shapes, and why.

    `families` holds more than one family when keys and shapes cannot tell (a tiny test
    LoRA, a UNet-only file with unusual widths); compatibility is then decided by
    matching the file's modules against the model. `metadata_family` is what the kohya
    metadata claims; `disagreement` says so when it contradicts the keys.
    """

    families: tuple[str, ...]
    evidence: str
    metadata_family: str | None = None
    disagreement: str | None = None

    @property
    def family(self) -> str | None:
        return self.families[0] if len(self.families) == 1 else None

    @property
    def label(self) -> str:
        return "/".join(self.families)


def metadata_family(metadata: Mapping[str, str]) -> str | None:
    """A1111's reading of kohya metadata: sdxl_* -> SDXL, ss_v2 == "True" -> SD2."""
    version = str(metadata.get("ss_base_model_version", ""))
    if version.startswith("sdxl_"):
        return "SDXL"
    if str(metadata.get("ss_v2", "")) == "True" or version.startswith("sd_v2"):
        return "SD2"
    if version.startswith("sd_v1") or "ss_network_module" in metadata:
        return "SD1"
    return None


def detect_lora_architecture(
    groups: Mapping[str, Group[Any]], metadata: Mapping[str, str] | None = None
) -> LoraArchitecture:
    """Which families a LoRA can be for, from its key names and tensor shapes."""
    families: set[str] = set(FAMILIES)
    evidence: list[str] = []
    names = [g.key for g in groups.values()]
    components = {g.component for g in groups.values()}
    if any(k.startswith(("lora_te1_", "lora_te2_")) for k in names) or "text_encoder_2" in (
        components
    ):
        families &= {"SDXL"}
        evidence.append("two text encoders")
    elif any(k.startswith("lora_te_") for k in names):
        families &= {"SD1", "SD2"}
        evidence.append("one text encoder")
    if any(re.search(r"(add_embedding|label_emb)", g.name) for g in groups.values()):
        families &= {"SDXL"}
        evidence.append("size/crop embedding")
    widths = {768: "SD1", 1024: "SD2", 2048: "SDXL"}
    for group in groups.values():
        down = group.parts.get("down")
        if down is None:
            continue
        in_features = _shape(down)[1] if len(_shape(down)) >= 2 else 0
        if re.search(r"attn2_to_[kv]$", group.name) and in_features in widths:
            families &= {widths[in_features]}
            evidence.append(f"cross-attention context width {in_features}")
            break
        te = group.component in ("text_encoder", None) and "self_attn_q_proj" in group.name
        if te and group.key.startswith(("lora_te_", "text_encoder.")):
            if in_features == 768:
                families &= {"SD1", "SDXL"}
                evidence.append("text encoder width 768")
            elif in_features == 1024:
                families &= {"SD2"}
                evidence.append("text encoder width 1024")
    claimed = metadata_family(metadata or {})
    found = tuple(f for f in FAMILIES if f in families)
    disagreement = None
    if claimed and found and claimed not in found:
        disagreement = (
            f"metadata says {claimed} but keys and shapes say {'/'.join(found)}; "
            "the keys are trusted"
        )
    if not found:
        found = tuple(FAMILIES)
        evidence.append("contradictory evidence")
    return LoraArchitecture(found, ", ".join(evidence) or "no telling keys", claimed, disagreement)


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class ParsedLora:
    """One file's tensors, grouped by target module. Model-independent, so it is cached."""

    source: str
    format: str
    groups: dict[str, Group[torch.Tensor]]
    unknown_keys: tuple[str, ...]
    metadata: dict[str, str]
    architecture: LoraArchitecture
    nbytes: int


def _peft_scales(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The scale rules of a PEFT LoraConfig (or diffusers' `lora_adapter_metadata`)."""

    def get(name: str, default: Any) -> Any:
        return config.get(prefix + name, default)

    return {
        "r": get("r", None),
        "alpha": get("lora_alpha", None),
        "rank_pattern": get("rank_pattern", {}) or {},
        "alpha_pattern": get("alpha_pattern", {}) or {},
        "rslora": bool(get("use_rslora", False)),
    }


def _pattern_value(patterns: Mapping[str, Any], dotted: str, default: Any) -> Any:
    """PEFT's rank/alpha_pattern lookup: a key matches the module path or its end."""
    for pattern, value in patterns.items():
        if re.fullmatch(pattern, dotted) or re.search(rf"(^|\.){pattern}$", dotted):
            return value
    return default


def _store_peft_scale(group: Group[torch.Tensor], rules: Mapping[str, Any], dotted: str) -> None:
    """Turn PEFT's lora_alpha / r into the stored `scale` part A1111's maths reads."""
    if rules.get("alpha") is None or "scale" in group.parts or "alpha" in group.parts:
        return
    rank = _pattern_value(rules["rank_pattern"], dotted, rules.get("r")) or group_rank(group)
    alpha = _pattern_value(rules["alpha_pattern"], dotted, rules["alpha"])
    if not rank:
        return
    scale = alpha / math.sqrt(rank) if rules["rslora"] else alpha / rank
    group.parts["scale"] = torch.tensor(float(scale))


def _read_peft_folder(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        config = json.loads((folder / PEFT_CONFIG).read_text())
    except (OSError, ValueError) as error:
        raise UnusableFileError(f"{folder.name}: unreadable {PEFT_CONFIG}: {error}") from error
    if not isinstance(config, dict):
        raise UnusableFileError(f"{folder.name}: {PEFT_CONFIG} is not a JSON object")
    for weights in PEFT_WEIGHTS:
        if (folder / weights).is_file():
            return load_state_dict(folder / weights), config
    raise UnusableFileError(f"{folder.name}: a PEFT folder without {' or '.join(PEFT_WEIGHTS)}")


def read_lora_file(path: Path) -> ParsedLora:
    """Read and parse a LoRA file or PEFT adapter folder.

    Args:
        path: a `.safetensors` / `.pt` / `.ckpt` file, or a folder with adapter_config.json.
    Returns:
        The parsed file. Raises UnusableFileError naming the file and the fault (empty,
        truncated, no LoRA keys, NaN/Inf values, ...).
    Example:
        >>> parsed = read_lora_file(Path("loras/ink.safetensors"))  # doctest: +SKIP
        >>> parsed.architecture.label  # doctest: +SKIP
        'SD1'
    """
    metadata: dict[str, str] = {}
    peft_config: dict[str, Any] | None = None
    if path.is_dir():
        state, peft_config = _read_peft_folder(path)
    else:
        if path.suffix.lower() == ".safetensors":
            metadata = dict(read_safetensors_header(path).metadata)
        state = load_state_dict(path, mmap=False)
    groups, unknown = group_keys(state)
    if not any(g.kind != "unsupported" for g in groups.values()):
        raise UnusableFileError(f"{path.name}: {not_a_lora_reason(list(state))}")
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UnusableFileError(f"{path.name}: tensor {key!r} holds NaN or Inf values")
    adapter_meta: dict[str, Any] = {}
    if "lora_adapter_metadata" in metadata:
        try:
            adapter_meta = json.loads(metadata["lora_adapter_metadata"])
        except ValueError:
            adapter_meta = {}
    for group in groups.values():
        dotted = group.key.split(".", 1)[1] if "." in group.key else group.key
        if peft_config is not None:
            _store_peft_scale(group, _peft_scales(peft_config), dotted)
        elif adapter_meta and group.component is not None:
            prefix = f"{group.component}."
            _store_peft_scale(group, _peft_scales(adapter_meta, prefix), dotted)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    return ParsedLora(
        source=path.name,
        format=file_format(groups, folder=peft_config is not None),
        groups=groups,
        unknown_keys=tuple(unknown),
        metadata=metadata,
        architecture=detect_lora_architecture(groups, metadata),
        nbytes=nbytes,
    )


def not_a_lora_reason(keys: Iterable[str]) -> str:
    """Why a weights file is no LoRA, in words a user can act on."""
    keys = list(keys)
    if not keys:
        return "not a LoRA: the file holds no tensors"
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in keys):
        return "not a LoRA: this is a full Stable Diffusion checkpoint (put it in models/)"
    if any(k.startswith(("down_blocks.", "conv_in.", "decoder.", "encoder.")) for k in keys):
        return "not a LoRA: this looks like a diffusers model component, not a LoRA"
    if any("emb_params" in k or k == "string_to_param" for k in keys):
        return "not a LoRA: this is a textual-inversion embedding"
    return f"not a LoRA: no LoRA/LyCORIS keys (first key: {keys[0]!r})"


# --------------------------------------------------------------------------- file cache


class LoraFileCache:
    """Parsed files by path + size + mtime, LRU under a memory budget in bytes.

    An unchanged file is never read twice while cached; a replaced file (new size or
    mtime) is read again, so a stale copy is never served. `reads` counts disk reads.
    """

    def __init__(self, budget_bytes: int = 2 << 30) -> None:
        self.budget_bytes = budget_bytes
        self.reads = 0
        self._items: OrderedDict[tuple[str, int, int], ParsedLora] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(path: Path) -> tuple[str, int, int]:
        """Identity of the file's current content (a folder: its weights file)."""
        target = path
        if path.is_dir():
            target = next((path / w for w in PEFT_WEIGHTS if (path / w).is_file()), path)
        try:
            stat = target.stat()
            config = path / PEFT_CONFIG
            extra = config.stat().st_mtime_ns if path.is_dir() and config.is_file() else 0
        except OSError as error:
            raise UnusableFileError(f"{path.name}: cannot be read ({error.strerror})") from error
        return (os.path.realpath(path), stat.st_size, stat.st_mtime_ns + extra)

    def get(self, path: Path) -> ParsedLora:
        """The parsed file, read from disk only when not cached under its current key."""
        key = self.key(path)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        parsed = read_lora_file(path)
        with self._lock:
            self.reads += 1
            stale = [k for k in self._items if k[0] == key[0]]
            for old in stale:
                del self._items[old]
            self._items[key] = parsed
            total = sum(p.nbytes for p in self._items.values())
            while total > self.budget_bytes and len(self._items) > 1:
                _, evicted = self._items.popitem(last=False)
                total -= evicted.nbytes
        return parsed

    def __contains__(self, path: Path) -> bool:
        with self._lock:
            return self.key(path) in self._items

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(p.nbytes for p in self._items.values())


# --------------------------------------------------------------------------- maths


def _f32(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tensor.to(device=device, dtype=torch.float32)


def _scalar(parts: Mapping[str, torch.Tensor], name: str) -> float | None:
    return float(parts[name].item()) if name in parts else None


def _rebuild(up: torch.Tensor, down: torch.Tensor, mid: torch.Tensor | None) -> torch.Tensor:
    """up @ down (conv kernels flattened), or the CP/Tucker form with a middle tensor."""
    if mid is not None:
        # mid: (r_up, r_down, kh, kw); up: (out, r_up); down: (r_down, in) -> (out, in, kh, kw)
        return torch.einsum("n m k l, i n, m j -> i j k l", mid, up.flatten(1), down.flatten(1))
    return up.flatten(1) @ down.flatten(1)


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """LyCORIS' Tucker weight: t (r, r, kh, kw), wa (r, out), wb (r, in) -> (out, in, kh, kw)."""
    temp = torch.einsum("i j k l, j r -> i r k l", t, wb.flatten(1))
    return torch.einsum("i j k l, i r -> r j k l", temp, wa.flatten(1))


def _kron(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    if w2.dim() == 4:
        w1 = w1.reshape(*w1.shape, 1, 1)
    return torch.kron(w1, w2.contiguous())


def unit_delta(group: Group[torch.Tensor], shape: torch.Size, device: torch.device) -> torch.Tensor:
    """The update of one module at multiplier 1 before any DoRA step, in fp32.

    kohya/A1111: up @ down * (stored scale, else alpha / rank, else 1); LoHa:
    (w1a @ w1b) * (w2a @ w2b) * alpha / rank; LoKr: kron(w1, w2), scaled by alpha / rank
    only when a factor is low-rank (LyCORIS stores alpha = rank when both are full).
    """
    p = {k: _f32(v, device) for k, v in group.parts.items() if v.is_floating_point()}
    kind = group.kind
    rank: int | None = None
    if kind == "lora":
        rank = p["down"].shape[0]
        delta = _rebuild(p["up"], p["down"], p.get("mid"))
    elif kind == "loha":
        rank = p["hada_w1_b"].shape[0]
        if "hada_t1" in p and "hada_t2" in p:
            first = _tucker(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"])
            second = _tucker(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"])
        else:
            first = _rebuild(p["hada_w1_a"], p["hada_w1_b"], None)
            second = _rebuild(p["hada_w2_a"], p["hada_w2_b"], None)
        delta = first * second
    elif kind == "lokr":
        if "lokr_w1" in p:
            w1 = p["lokr_w1"]
        else:
            w1, rank = p["lokr_w1_a"] @ p["lokr_w1_b"], p["lokr_w1_b"].shape[0]
        if "lokr_w2" in p:
            w2 = p["lokr_w2"]
        elif "lokr_t2" in p:
            w2, rank = (
                _tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"]),
                p["lokr_w2_b"].shape[0],
            )
        else:
            w2 = _rebuild(p["lokr_w2_a"], p["lokr_w2_b"], None)
            rank = p["lokr_w2_b"].shape[0]
        delta = _kron(w1, w2)
    else:
        raise UnusableFileError(f"{group.key}: not a module type we can merge")
    if delta.numel() != math.prod(shape):
        raise ValueError(
            f"{group.key}: update has shape {tuple(delta.shape)}, layer {tuple(shape)}"
        )
    scale = _scalar(group.parts, "scale")
    if scale is None:
        alpha = _scalar(group.parts, "alpha")
        scale = alpha / rank if alpha is not None and rank else 1.0
    return delta.reshape(shape) * scale


def _column_norm(weight: torch.Tensor) -> torch.Tensor:
    """Norm of each input column over all other axes, shaped (1, in, 1, ...)."""
    columns = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
    return columns.reshape(1, weight.shape[1], *[1] * (weight.dim() - 2))


def _row_norm(weight: torch.Tensor) -> torch.Tensor:
    """Norm of each output row over all other axes, shaped (out, 1, ...)."""
    rows = weight.reshape(weight.shape[0], -1).norm(dim=1)
    return rows.reshape(weight.shape[0], *[1] * (weight.dim() - 1))


def module_delta(group: Group[torch.Tensor], base: torch.Tensor, multiplier: float) -> torch.Tensor:
    """What one module of one LoRA adds to `base` (fp32) at `multiplier`.

    DoRA, kohya/LyCORIS `dora_scale` (A1111's apply_weight_decompose): the scaled update is
    added to the base, each input column renormalised to dora_scale, the base subtracted
    again, then the multiplier applied. PEFT `lora_magnitude_vector`: PEFT's row-wise
    definition, W' = m * (W + s*BA) / ||W + s*BA||_row, with the multiplier inside s.
    """
    delta = unit_delta(group, base.shape, base.device)
    if "magnitude" in group.parts:
        magnitude = _f32(group.parts["magnitude"], base.device)
        merged = base + delta * multiplier
        scale = magnitude.reshape(-1, *[1] * (base.dim() - 1)) / _row_norm(merged)
        return merged * scale - base
    if "dora_scale" in group.parts:
        dora = _f32(group.parts["dora_scale"], base.device)
        merged = base + delta
        if (
            dora.shape[0] == base.shape[0]
            and dora.numel() == base.shape[0]
            and (dora.numel() != base.shape[1])
        ):
            norm = _row_norm(merged)  # LyCORIS wd_on_out files
            dora = dora.reshape(norm.shape)
        else:
            norm = _column_norm(merged)
            dora = dora.reshape(norm.shape)
        delta = merged * (dora / norm) - base
    return delta * multiplier


# --------------------------------------------------------------------------- targets


_RESNET_LDM = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}


def ldm_unet_name(name: str, layers_per_block: int, up_has_attention: list[bool]) -> str | None:
    """A diffusers UNet module path -> its LDM/SGM name with `_` separators (kohya SDXL
    and old A1111 files use these), or None where there is no counterpart."""
    per = layers_per_block + 1
    m = re.match(r"^(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$", name)
    if m:
        side, i, what, j, tail = (
            m.group(1),
            int(m.group(2)),
            m.group(3),
            int(m.group(4)),
            m.group(5),
        )
        tail = _RESNET_LDM.get(tail, tail) if what == "resnets" else tail
        slot = 0 if what == "resnets" else 1
        index = 1 + i * per + j if side == "down" else i * (layers_per_block + 1) + j
        block = "input_blocks" if side == "down" else "output_blocks"
        return f"{block}_{index}_{slot}_{tail.replace('.', '_')}"
    m = re.match(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv$", name)
    if m:
        return f"input_blocks_{(int(m.group(1)) + 1) * per}_0_op"
    m = re.match(r"^up_blocks\.(\d+)\.upsamplers\.0\.conv$", name)
    if m:
        i = int(m.group(1))
        slot = 2 if i < len(up_has_attention) and up_has_attention[i] else 1
        return f"output_blocks_{i * per + layers_per_block}_{slot}_conv"
    m = re.match(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", name)
    if m:
        what, j, tail = m.group(1), int(m.group(2)), m.group(3)
        if what == "resnets":
            return f"middle_block_{2 * j}_{_RESNET_LDM.get(tail, tail).replace('.', '_')}"
        return f"middle_block_1_{tail.replace('.', '_')}"
    fixed = {
        "conv_in": "input_blocks_0_0",
        "conv_out": "out_2",
        "time_embedding.linear_1": "time_embed_0",
        "time_embedding.linear_2": "time_embed_2",
        "add_embedding.linear_1": "label_emb_0_0",
        "add_embedding.linear_2": "label_emb_0_2",
    }
    return fixed.get(name)


@dataclass(frozen=True)
class Target:
    """One mergeable layer of the pipeline."""

    component: str
    module: str

    @property
    def is_text_encoder(self) -> bool:
        return self.component != "unet"


class TargetIndex:
    """Every spelling a LoRA file may use for each Linear/Conv layer of the pipeline."""

    def __init__(self, pipe: Any) -> None:
        self.modules: dict[Target, torch.nn.Module] = {}
        self.aliases: dict[str, dict[str, Target]] = {}
        for component in COMPONENTS:
            model = getattr(pipe, component, None)
            if not isinstance(model, torch.nn.Module):
                continue
            table: dict[str, Target] = {}
            ldm: dict[str, Target] = {}
            config = getattr(model, "config", None)
            per = getattr(config, "layers_per_block", 2) if component == "unet" else 0
            per = per if isinstance(per, int) else per[0]
            up_attn = ["CrossAttn" in t for t in (getattr(config, "up_block_types", None) or [])]
            for name, module in model.named_modules():
                if not isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                    continue
                target = Target(component, name)
                self.modules[target] = module
                table[name.replace(".", "_")] = target
                if component == "unet":
                    old = ldm_unet_name(name, per, up_attn)
                    if old:
                        ldm[old] = target
                        ldm["diffusion_model_" + old] = target
                elif name.startswith("text_model."):
                    table[name[len("text_model.") :].replace(".", "_")] = target
                else:
                    table["text_model_" + name.replace(".", "_")] = target
            for alias, target in ldm.items():
                table.setdefault(alias, target)
            self.aliases[component] = table

    def find(self, group: Group[Any]) -> Target | None:
        """The layer a group names, checking that the shapes can fit."""
        components = [group.component] if group.component else list(self.aliases)
        for component in components:
            target = self.aliases.get(component, {}).get(group.name)
            if target is not None and _fits(group, self.modules[target]):
                return target
        return None


def _fits(group: Group[Any], module: torch.nn.Module) -> bool:
    """Cheap shape check: a low-rank LoRA's in/out features must match the layer."""
    weight = module.weight
    if group.kind == "lora":
        up, down = _shape(group.parts["up"]), _shape(group.parts["down"])
        if "mid" in group.parts:
            return up[0] == weight.shape[0] and down[1] == weight.shape[1]
        numel = up[0] * math.prod(down[1:])
        return up[0] == weight.shape[0] and numel == weight.numel()
    return True


# --------------------------------------------------------------------------- application


@dataclass(frozen=True)
class Resolution:
    """One file resolved against one pipeline: group -> layer, plus what was skipped."""

    targets: dict[str, Target]
    skipped: tuple[str, ...]
    unsupported: tuple[str, ...]


Contribution = tuple[tuple[str, int, int], str, float]  # (file key, group key, multiplier)


@dataclass
class _Plan:
    layers: dict[Target, list[tuple[ParsedLora, Contribution]]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def check_compatible(parsed: ParsedLora, model_family: str, name: str) -> None:
    """Refuse a LoRA made for another family, naming both architectures."""
    if model_family not in parsed.architecture.families:
        raise UnusableFileError(
            f"LoRA '{name}' is for {parsed.architecture.label} "
            f"({parsed.architecture.evidence}) but the model is {model_family}",
            field="loras",
        )


class LoraApplier:
    """Keeps one pipeline's weights equal to base + the deltas of the requested stack.

    Each touched layer's base weight is copied to the CPU the first time it is touched;
    `apply` recomputes only layers whose set of contributions changed, and restores layers
    no longer touched from that copy, so an empty stack is the base model bit for bit.

    Example:
        >>> applier = LoraApplier(pipe, Architecture.SD1, cache)  # doctest: +SKIP
        >>> warnings = applier.apply([(entry, 0.8, 0.8)])  # doctest: +SKIP
    """

    def __init__(
        self, pipe: Any, architecture: Architecture, cache: LoraFileCache | None = None
    ) -> None:
        self.pipe = pipe
        self.architecture = architecture
        self.cache = cache if cache is not None else LoraFileCache()
        self.index = TargetIndex(pipe)
        self._backup: dict[Target, torch.Tensor] = {}
        self._applied: dict[Target, tuple[Contribution, ...]] = {}
        self._resolutions: dict[tuple[tuple[str, int, int], str], Resolution] = {}

    # -- public

    def apply(self, resolved: list[tuple[LoraEntry, float, float]]) -> list[str]:
        """Make the live weights exactly base + the stack's deltas.

        Args:
            resolved: (entry, unet multiplier, text-encoder multiplier) in stack order;
                a multiplier of 0 means that part is absent.
        Returns:
            Warnings for the caller to show (partial matches, metadata disagreements).
        Raises:
            UnusableFileError: a file that cannot be read, is for another family, or
                matches nothing in the model. Nothing is changed in that case.
        """
        for entry, unet_w, te_w in resolved:
            if entry.error and (unet_w or te_w):
                raise UnusableFileError(f"LoRA '{entry.name}': {entry.error}", field="loras")
        return self.apply_paths([(e.path, e.name, u, t) for e, u, t in resolved])

    def apply_paths(self, stack: list[tuple[Path, str, float, float]]) -> list[str]:
        """`apply` for (path, display name, unet weight, te weight) tuples."""
        plan = self._plan(stack)  # 1. validate every file before touching any weight
        wanted = {t: tuple(c for _, c in items) for t, items in plan.layers.items()}
        with torch.no_grad():
            for target in [t for t in self._applied if t not in wanted]:  # 2. untouched
                self._restore_layer(target)
            for target, items in plan.layers.items():  # 3. changed layers only
                if self._applied.get(target) != wanted[target]:
                    self._merge_layer(target, items)
        return plan.warnings

    def restore(self) -> None:
        """Put every touched layer back to its base weight and forget the backups."""
        with torch.no_grad():
            for target in list(self._applied):
                self._restore_layer(target)
        self._backup.clear()

    @property
    def applied_layers(self) -> int:
        return len(self._applied)

    # -- steps

    def resolve(self, parsed: ParsedLora, key: tuple[str, int, int]) -> Resolution:
        """Match a parsed file's groups to this pipeline's layers (cached per file key)."""
        cached = self._resolutions.get((key, ""))
        if cached is not None:
            return cached
        targets: dict[str, Target] = {}
        skipped: list[str] = []
        unsupported: list[str] = []
        for group in parsed.groups.values():
            if group.kind == "unsupported":
                if set(group.parts) - {"alpha", "scale", "dora_scale", "magnitude"}:
                    unsupported.append(group.key)
                continue
            target = self.index.find(group)
            if target is None:
                skipped.append(group.key)
            else:
                targets[group.key] = target
        resolution = Resolution(targets, tuple(skipped), tuple(unsupported))
        self._resolutions[(key, "")] = resolution
        return resolution

    def _plan(self, stack: list[tuple[Path, str, float, float]]) -> _Plan:
        plan = _Plan()
        family = self.architecture.family
        for path, name, unet_w, te_w in stack:
            if unet_w == 0 and te_w == 0:
                continue
            key = LoraFileCache.key(path)
            parsed = self.cache.get(path)
            check_compatible(parsed, family, name)
            resolution = self.resolve(parsed, key)
            if not resolution.targets:
                raise UnusableFileError(
                    f"LoRA '{name}' matches no layer of this {family} model "
                    f"({len(parsed.groups)} modules in the file, e.g. "
                    f"{next(iter(parsed.groups), '?')!r})",
                    field="loras",
                )
            total = len(resolution.targets) + len(resolution.skipped)
            if resolution.skipped:
                plan.warnings.append(
                    f"LoRA '{name}': {len(resolution.skipped)} of {total} modules match "
                    f"nothing in the model and were skipped (e.g. {resolution.skipped[0]!r})"
                )
            if resolution.unsupported or parsed.unknown_keys:
                count = len(resolution.unsupported) + len(parsed.unknown_keys)
                plan.warnings.append(
                    f"LoRA '{name}': {count} keys of a kind we do not merge were ignored"
                )
            if parsed.architecture.disagreement:
                plan.warnings.append(f"LoRA '{name}': {parsed.architecture.disagreement}")
            for group_key, target in resolution.targets.items():
                multiplier = te_w if target.is_text_encoder else unet_w
                if multiplier == 0:
                    continue
                plan.layers.setdefault(target, []).append(
                    (parsed, (key, group_key, float(multiplier)))
                )
        return plan

    def _restore_layer(self, target: Target) -> None:
        weight = self.index.modules[target].weight
        weight.data.copy_(self._backup[target].to(weight.device))
        self._applied.pop(target, None)

    def _merge_layer(self, target: Target, items: list[tuple[ParsedLora, Contribution]]) -> None:
        weight = self.index.modules[target].weight
        if target not in self._backup:
            self._backup[target] = weight.detach().to("cpu", copy=True)
        base = self._backup[target].to(device=weight.device, dtype=torch.float32)
        total = base.clone()
        try:
            for parsed, (_key, group_key, multiplier) in items:
                total += module_delta(parsed.groups[group_key], base, multiplier)
        except ValueError as error:
            raise UnusableFileError(f"{parsed.source}: {error}", field="loras") from error
        weight.data.copy_(total.to(weight.dtype))
        self._applied[target] = tuple(c for _, c in items)
