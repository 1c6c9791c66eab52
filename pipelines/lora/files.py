"""Reading LoRA files and PEFT folders into parsed groups, and the parsed-file cache."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.errors import UnusableFileError
from pipelines.lora.family import LoraArchitecture, detect_lora_architecture
from pipelines.lora.keys import (
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    Group,
    file_format,
    group_keys,
    group_rank,
)
from pipelines.safeload import load_state_dict, read_safetensors_header

log = logging.getLogger(__name__)

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
