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
from pipelines.lora.coverage import LoraCoverage, count_regions, group_region, region_of
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


@dataclass
class _Plan:
    layers: dict[Target, list[tuple[ParsedLora, Contribution]]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    coverage: list[LoraCoverage] = field(default_factory=list)


def stored_weight(module: torch.nn.Module, name: str = "weight") -> torch.Tensor:
    """The tensor that really holds a layer's weight (or `bias`): the parameter's data, or,
    under accelerate's sequential CPU offload (`--lowvram`: the parameter sits on `meta`),
    the CPU copy its hook loads before every call. Merges write into that tensor in place,
    so they reach the next forward pass in every memory mode."""
    return stored_tensor(module, name)


def stored_bias(module: torch.nn.Module) -> torch.Tensor | None:
    """`stored_weight` for the layer's bias, or None when it has none."""
    return stored_weight(module, "bias") if getattr(module, "bias", None) is not None else None


Backup = tuple[torch.Tensor, torch.Tensor | None]
"""A layer's base weight and bias (None: no bias), on the CPU."""


def _nbytes(backup: Backup) -> int:
    return sum(t.numel() * t.element_size() for t in backup if t is not None)


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
        self._backup: OrderedDict[Target, Backup] = OrderedDict()
        self._applied: dict[Target, tuple[Contribution, ...]] = {}
        self._resolutions: dict[tuple[tuple[str, int, int], str], Resolution] = {}

    # -- public

    def apply(self, resolved: list[tuple[LoraEntry, float, float]]) -> list[str]:
        """Make the live weights exactly base + the stack's deltas.

        Args:
            resolved: (entry, unet multiplier, text-encoder multiplier) in stack order;
                a multiplier of 0 means that part is absent.
        Returns:
            Warnings for the caller to show (partial matches with what was skipped,
            metadata disagreements); `coverage` gives the full report of each LoRA.
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
        for report in plan.coverage:
            log.log(logging.INFO if report.complete else logging.WARNING, report.summary())
        return plan.warnings

    def coverage(self, resolved: list[tuple[LoraEntry, float, float]]) -> list[LoraCoverage]:
        """The coverage report of each LoRA of a stack with a weight, against this model.

        Args:
            resolved: as for `apply`.
        Returns:
            One report per LoRA with a non-zero weight, in stack order. Files that cannot
            be read are left out (applying them raises with the reason).
        """
        return self.coverage_paths([(e.path, e.name, u, t) for e, u, t in resolved if not e.error])

    def coverage_paths(self, stack: list[tuple[Path, str, float, float]]) -> list[LoraCoverage]:
        """`coverage` for (path, display name, unet weight, te weight) tuples."""
        reports = []
        for path, name, unet_w, te_w in stack:
            if unet_w == 0 and te_w == 0:
                continue
            try:
                parsed = self.cache.get(path)
            except UnusableFileError:
                continue
            reports.append(self.report(parsed, LoraFileCache.key(path), name))
        return reports

    def report(self, parsed: ParsedLora, key: tuple[str, int, int], name: str) -> LoraCoverage:
        """How many of a parsed file's modules match this model, by region."""
        resolution = self.resolve(parsed, key)
        matched = [region_of(t.component, t.module) for t in resolution.targets.values()]
        skipped = [group_region(parsed.groups[k]) for k in resolution.skipped]
        return LoraCoverage(
            name=name,
            matched=len(matched),
            total=len(matched) + len(skipped),
            regions=count_regions(matched, skipped),
            skipped=resolution.skipped,
            ignored=resolution.unsupported + parsed.unknown_keys,
        )

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
        return sum(_nbytes(backup) for backup in self._backup.values())

    def _trim_backups(self) -> None:
        """Drop backups of layers at base, oldest first, until the budget holds."""
        total = self.backup_bytes
        for target in [t for t in self._backup if t not in self._applied]:
            if total <= self.backup_budget:
                break
            total -= _nbytes(self._backup.pop(target))

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
            report = self.report(parsed, key, name)
            if not resolution.targets:
                raise UnusableFileError(
                    f"LoRA '{name}' matches no layer of this {family} model: {report.details()}",
                    field="loras",
                )
            plan.coverage.append(report)
            if not report.complete:
                plan.warnings.append(report.summary())
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
        module = self.index.modules[target]
        weight, bias = stored_weight(module), stored_bias(module)
        base_weight, base_bias = self._backup[target]
        weight.copy_(base_weight.to(weight.device))
        if bias is not None and base_bias is not None:
            bias.copy_(base_bias.to(bias.device))
        self._applied.pop(target, None)

    def _merge_layer(self, target: Target, items: list[tuple[ParsedLora, Contribution]]) -> None:
        module = self.index.modules[target]
        weight, bias = stored_weight(module), stored_bias(module)
        if target not in self._backup:
            self._backup[target] = (weight.detach().to("cpu", copy=True), None)
        self._backup.move_to_end(target)
        base_weight, base_bias = self._backup[target]
        touches_bias = any(
            {"diff_b", "b_norm"} & set(parsed.groups[group_key].parts)
            for parsed, (_key, group_key, _m) in items
        )
        if touches_bias and bias is not None and base_bias is None:
            # the bias is still the base one: only a backed-up bias is ever changed
            base_bias = bias.detach().to("cpu", copy=True)
            self._backup[target] = (base_weight, base_bias)
        base = base_weight.to(device=weight.device, dtype=torch.float32)
        total = base.clone()
        base_b = None if base_bias is None else base_bias.to(weight.device, torch.float32)
        total_b = None if base_b is None else base_b.clone()
        try:
            for parsed, (_key, group_key, multiplier) in items:
                delta, bias_delta = module_delta(parsed.groups[group_key], base, multiplier, base_b)
                total += delta
                if bias_delta is not None and total_b is not None:
                    total_b += bias_delta
        except ValueError as error:
            raise UnusableFileError(f"{parsed.source}: {error}", field="loras") from error
        weight.copy_(total.to(weight.dtype))
        if bias is not None and total_b is not None:
            bias.copy_(total_b.to(bias.dtype))
        self._applied[target] = tuple(c for _, c in items)
