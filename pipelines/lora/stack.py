"""The adapter stack: keeps a pipeline's weights equal to base + the requested LoRAs.

We own the merge path instead of diffusers' `load_lora_weights`, which refuses LyCORIS
LoHa/LoKr files and silently drops DoRA magnitudes. Deltas are merged into the weights as
`base + sum(deltas)` in fp32 from a CPU backup of the base weight (as A1111 does): merged
weights cost nothing per step, and removing every LoRA restores the base bit-exactly. This
is the one place that knows how weights are stored and changed.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipelines.architecture import Architecture
from pipelines.devices import stored_tensor
from pipelines.errors import UnusableFileError
from pipelines.lora.files import LoraFileCache, ParsedLora
from pipelines.lora.maths import module_delta
from pipelines.lora.targets import Target, TargetIndex

if TYPE_CHECKING:
    from pipelines.folders.loras import LoraEntry

log = logging.getLogger(__name__)

DEFAULT_BACKUP_BUDGET = 2 << 30
"""Bytes of base-weight backups kept for layers no stack touches any more."""


@dataclass(frozen=True)
class Resolution:
    """One file resolved against one pipeline: group -> layer, plus what was skipped."""

    targets: dict[str, Target]
    skipped: tuple[str, ...]
    unsupported: tuple[str, ...]


Contribution = tuple[tuple[str, int, int], str, float]  # (file key, group key, multiplier)

REGIONS = ("text encoder", "text encoder 2", "UNet down", "UNet mid", "UNet up", "other")


def target_region(target: Target) -> str:
    """Where a matched layer sits: which text encoder, or which part of the UNet."""
    if target.component == "text_encoder_2":
        return "text encoder 2"
    if target.is_text_encoder:
        return "text encoder"
    for prefix, region in (("down_blocks", "UNet down"), ("mid_block", "UNet mid")):
        if target.module.startswith(prefix):
            return region
    return "UNet up" if target.module.startswith("up_blocks") else "other"


def key_region(key: str) -> str:
    """Where an unmatched module was meant to go, read from its spelling (kohya, LDM,
    diffusers and PEFT names)."""
    low = key.lower()
    if any(mark in low for mark in ("te2", "text_encoder_2", "te_2", "embedders_1")):
        return "text encoder 2"
    if any(mark in low for mark in ("lora_te", "text_encoder", "te1", "te_text", "cond_stage")):
        return "text encoder"
    for marks, region in (
        (("down_blocks", "down_", "input_blocks"), "UNet down"),
        (("mid_block", "middle_block", "mid_"), "UNet mid"),
        (("up_blocks", "up_", "output_blocks"), "UNet up"),
    ):
        if any(mark in low for mark in marks):
            return region
    return "other"


@dataclass(frozen=True)
class LoraCoverage:
    """How much of one LoRA file found a layer of the model, per region."""

    name: str
    matched: dict[str, int]
    skipped: dict[str, list[str]]  # region -> module keys that matched nothing
    ignored: int  # keys of a kind we do not merge

    @property
    def total(self) -> int:
        return sum(self.matched.values()) + sum(len(v) for v in self.skipped.values())

    def describe(self) -> str:
        """One line: `LoRA 'ink': 60 of 64 modules applied (text encoder 12, UNet down 20,
        ...); 4 matched nothing (UNet up: e.g. 'lora_unet_...')`."""
        applied = sum(self.matched.values())
        parts = ", ".join(f"{region} {count}" for region, count in self.matched.items())
        text = f"LoRA '{self.name}': {applied} of {self.total} modules applied ({parts})"
        if self.skipped:
            misses = "; ".join(
                f"{region} {len(keys)}, e.g. {keys[0]!r}" for region, keys in self.skipped.items()
            )
            text += f"; {sum(len(v) for v in self.skipped.values())} matched nothing ({misses})"
        if self.ignored:
            text += f"; {self.ignored} keys of a kind we do not merge were ignored"
        return text

    def as_dict(self) -> dict[str, object]:
        """The API's `lora_coverage` entry."""
        return {
            "modules": self.total,
            "applied": sum(self.matched.values()),
            "applied_by_region": dict(self.matched),
            "skipped_by_region": {region: len(keys) for region, keys in self.skipped.items()},
            "skipped_examples": {region: keys[:3] for region, keys in self.skipped.items()},
            "ignored_keys": self.ignored,
        }


def coverage(name: str, resolution: Resolution, ignored: int) -> LoraCoverage:
    matched: dict[str, int] = {}
    for target in resolution.targets.values():
        region = target_region(target)
        matched[region] = matched.get(region, 0) + 1
    skipped: dict[str, list[str]] = {}
    for key in resolution.skipped:
        skipped.setdefault(key_region(key), []).append(key)

    def ordered(found: dict) -> dict:
        return {region: found[region] for region in REGIONS if region in found}

    return LoraCoverage(name, ordered(matched), ordered(skipped), ignored)


@dataclass
class _Plan:
    layers: dict[Target, list[tuple[ParsedLora, Contribution]]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    coverage: list[LoraCoverage] = field(default_factory=list)


def stored_weight(module: torch.nn.Module) -> torch.Tensor:
    """The tensor that really holds a layer's weight: the parameter's data, or, under
    accelerate's sequential CPU offload (`--lowvram`: the parameter sits on `meta`), the
    CPU copy its hook loads before every call. Merges write into that tensor in place, so
    they reach the next forward pass in every memory mode."""
    return stored_tensor(module, "weight")


def check_compatible(parsed: ParsedLora, model_family: str, name: str) -> None:
    """Refuse a LoRA made for another family, naming both architectures."""
    if model_family not in parsed.architecture.families:
        raise UnusableFileError(
            f"LoRA '{name}' is for {parsed.architecture.label} "
            f"({parsed.architecture.evidence}) but the model is {model_family}",
            field="loras",
        )


class AdapterStack:
    """Keeps one pipeline's weights equal to base + the deltas of the requested stack.

    Each touched layer's base weight is copied to the CPU the first time it is touched;
    `apply` recomputes only layers whose set of contributions changed, and restores layers
    no longer touched from that copy, so an empty stack is the base model bit for bit.
    Backups of layers that are back at base are kept for the next stack only while all
    backups fit `backup_budget` bytes (least recently used go first); backups of layers a
    LoRA is applied to are always kept, since the exact restore needs them.

    Example:
        >>> stack = AdapterStack(pipe, Architecture.SD1, cache)  # doctest: +SKIP
        >>> warnings = stack.apply([(entry, 0.8, 0.8)])  # doctest: +SKIP
    """

    def __init__(
        self,
        pipe: Any,
        architecture: Architecture,
        cache: LoraFileCache | None = None,
        *,
        backup_budget: int = DEFAULT_BACKUP_BUDGET,
    ) -> None:
        self.pipe = pipe
        self.architecture = architecture
        self.cache = cache if cache is not None else LoraFileCache()
        self.backup_budget = backup_budget
        self.index = TargetIndex(pipe)
        self._backup: OrderedDict[Target, torch.Tensor] = OrderedDict()
        self._applied: dict[Target, tuple[Contribution, ...]] = {}
        self._resolutions: dict[tuple[tuple[str, int, int], str], Resolution] = {}
        self.coverage: list[LoraCoverage] = []  # the last `apply`'s report, per LoRA

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
        self._trim_backups()
        self.coverage = plan.coverage
        return plan.warnings

    def misfit(self, path: Path, name: str) -> str | None:
        """Why the LoRA at `path` cannot apply to this model (another family, no layer
        matches), or None when it fits; nothing is changed."""
        try:
            self._plan([(path, name, 1.0, 1.0)])
        except UnusableFileError as error:
            return error.message
        return None

    def restore(self) -> None:
        """Put every touched layer back to its base weight and forget the backups."""
        with torch.no_grad():
            for target in list(self._applied):
                self._restore_layer(target)
        self._backup.clear()

    @property
    def applied_layers(self) -> int:
        return len(self._applied)

    @property
    def backup_bytes(self) -> int:
        """Bytes held by base-weight backups now."""
        return sum(t.numel() * t.element_size() for t in self._backup.values())

    def _trim_backups(self) -> None:
        """Drop backups of layers at base, oldest first, until the budget holds."""
        total = self.backup_bytes
        for target in [t for t in self._backup if t not in self._applied]:
            if total <= self.backup_budget:
                break
            dropped = self._backup.pop(target)
            total -= dropped.numel() * dropped.element_size()

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
            ignored = len(resolution.unsupported) + len(parsed.unknown_keys)
            report = coverage(name, resolution, ignored)
            plan.coverage.append(report)
            log.info("%s", report.describe())
            if resolution.skipped or ignored:
                plan.warnings.append(report.describe())
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
        weight = stored_weight(self.index.modules[target])
        weight.copy_(self._backup[target].to(weight.device))
        self._applied.pop(target, None)

    def _merge_layer(self, target: Target, items: list[tuple[ParsedLora, Contribution]]) -> None:
        weight = stored_weight(self.index.modules[target])
        if target not in self._backup:
            self._backup[target] = weight.detach().to("cpu", copy=True)
        self._backup.move_to_end(target)
        base = self._backup[target].to(device=weight.device, dtype=torch.float32)
        total = base.clone()
        try:
            for parsed, (_key, group_key, multiplier) in items:
                total += module_delta(parsed.groups[group_key], base, multiplier)
        except ValueError as error:
            raise UnusableFileError(f"{parsed.source}: {error}", field="loras") from error
        weight.copy_(total.to(weight.dtype))
        self._applied[target] = tuple(c for _, c in items)
