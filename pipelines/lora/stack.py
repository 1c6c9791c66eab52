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
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipelines.architecture import Architecture
from pipelines.devices import stored_tensor
from pipelines.errors import UnusableFileError
from pipelines.lora.coverage import (
    LoraCoverage,
    count_regions,
    group_region,
    region_of,
    unet_region,
)
from pipelines.lora.files import LoraFileCache, ParsedLora
from pipelines.lora.keys import Group
from pipelines.lora.maths import LoraFactors, add_lora, lora_factors, module_delta
from pipelines.lora.targets import Target, TargetIndex
from pipelines.lora.weights import BlockWeights, layer_ratio

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


@dataclass(frozen=True)
class StackEntry:
    """One LoRA of a stack as the adapter stack applies it.

    `unet`/`te` are its multipliers now (0: that part is absent); `blocks` scales them per
    layer; `scheduled` keeps its layers known even at weight 0, since a per-step schedule
    will raise it (`reweight`).
    """

    path: Path
    name: str
    unet: float
    te: float
    blocks: BlockWeights | None = None
    scheduled: bool = False


StackItem = StackEntry | tuple[Path, str, float, float]
"""A stack entry, or (path, display name, unet weight, te weight)."""


@dataclass(frozen=True)
class _Slot:
    """One group of one stack entry on one layer, with the layer's block ratio."""

    entry: int
    parsed: ParsedLora
    key: tuple[str, int, int]
    group_key: str
    is_text_encoder: bool
    ratio: float


@dataclass
class _Plan:
    slots: dict[Target, list[_Slot]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    coverage: list[LoraCoverage] = field(default_factory=list)


def _entry(item: StackItem) -> StackEntry:
    return item if isinstance(item, StackEntry) else StackEntry(*item)


def stored_weight(module: torch.nn.Module, name: str = "weight") -> torch.Tensor:
    """The tensor that really holds a layer's weight (or `bias`): the parameter's data, or,
    under accelerate's sequential CPU offload (`--lowvram`: the parameter sits on `meta`),
    the CPU copy its hook loads before every call. Merges write into that tensor in place,
    so they reach the next forward pass in every memory mode."""
    return stored_tensor(module, name)


def stored_bias(module: torch.nn.Module) -> torch.Tensor | None:
    """`stored_weight` for the layer's bias, or None when it has none."""
    return stored_weight(module, "bias") if getattr(module, "bias", None) is not None else None


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy of a layer's tensor for its backup: in pinned memory when the tensor is
    on CUDA, so restores and merges copy it back without the host waiting for the
    device."""
    if tensor.device.type == "cuda":
        try:
            pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        except RuntimeError:  # no page-locked memory to be had: a plain copy, only slower
            log.info("pinned memory refused; LoRA backups use pageable memory")
        else:
            return pinned.copy_(tensor.detach())
    return tensor.detach().to("cpu", copy=True)


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
        self.merges = 0  # `apply` calls that changed any weight (ZeroGPU counts where they ran)
        self._resolutions: dict[tuple[tuple[str, int, int], str], Resolution] = {}
        self._entries: list[StackEntry] = []  # the stack last applied, with its weights now
        self._slots: dict[Target, list[_Slot]] = {}  # its groups on each layer, in order
        # plain LoRA groups' fp32 factors on the device, for the files of the last plan
        self._factors: dict[tuple[tuple[str, int, int], str, str], LoraFactors | None] = {}
        self._buffer: torch.Tensor | None = None  # scratch for one update (`_scratch`)

    # -- public

    def apply(
        self,
        resolved: list[tuple[LoraEntry, float, float]],
        blocks: Sequence[BlockWeights | None] = (),
        scheduled: Sequence[bool] = (),
    ) -> list[str]:
        """Make the live weights exactly base + the stack's deltas.

        Args:
            resolved: (entry, unet multiplier, text-encoder multiplier) in stack order;
                a multiplier of 0 means that part is absent.
            blocks: each entry's block weights (missing or None: 1 on every layer).
            scheduled: whether each entry's weights change per step (see `StackEntry`).
        Returns:
            Warnings for the caller to show (partial matches with what was skipped,
            metadata disagreements); `coverage` gives the full report of each LoRA.
        Raises:
            UnusableFileError: a file that cannot be read, is for another family, or
                matches nothing in the model. InvalidRequestError: block weights that do
                not fit the model's family. Nothing is changed in either case.
        """
        for index, (entry, unet_w, te_w) in enumerate(resolved):
            live = unet_w or te_w or (index < len(scheduled) and scheduled[index])
            if entry.error and live:
                raise UnusableFileError(f"LoRA '{entry.name}': {entry.error}", field="loras")
        return self.apply_paths(
            [
                StackEntry(
                    e.path,
                    e.name,
                    u,
                    t,
                    blocks[i] if i < len(blocks) else None,
                    i < len(scheduled) and scheduled[i],
                )
                for i, (e, u, t) in enumerate(resolved)
            ]
        )

    def apply_paths(self, stack: Sequence[StackItem]) -> list[str]:
        """`apply` for stack entries or (path, display name, unet weight, te weight)."""
        entries = [_entry(item) for item in stack]
        plan = self._plan(entries)  # 1. validate every file before touching any weight
        self._entries, self._slots = entries, plan.slots
        files = {slot.key for slots in plan.slots.values() for slot in slots}
        self._factors = {k: v for k, v in self._factors.items() if k[0] in files}
        changed = 0
        with torch.no_grad():
            for target in [t for t in self._applied if t not in plan.slots]:  # 2. untouched
                self._restore_layer(target)
                changed += 1
            for target in plan.slots:  # 3. changed layers only
                changed += self._update_layer(target)
        self.merges += changed > 0
        self._trim_backups()
        for report in plan.coverage:
            log.log(logging.INFO if report.complete else logging.WARNING, report.summary())
        return plan.warnings

    def reweight(self, weights: dict[int, tuple[float, float]]) -> int:
        """Give entries of the stack last applied new (unet, te) multipliers, re-merging
        only the layers whose contributions change, each once, from its backup.

        This is what a per-step schedule calls: its cost is that of merging the scheduled
        LoRA's layers (and whatever else sits on them), nothing when no weight changes.

        Args:
            weights: stack position -> (unet multiplier, text-encoder multiplier).
        Returns:
            How many layers were merged or restored.
        """
        touched_parts: dict[int, tuple[bool, bool]] = {}  # entry -> (unet, te) changed
        for index, (unet_w, te_w) in weights.items():
            entry = self._entries[index]
            if (entry.unet, entry.te) != (unet_w, te_w):
                touched_parts[index] = (entry.unet != unet_w, entry.te != te_w)
                self._entries[index] = replace(entry, unet=unet_w, te=te_w)
        if not touched_parts:
            return 0
        changed = 0
        with torch.no_grad():
            for target, slots in self._slots.items():
                part = 1 if target.is_text_encoder else 0
                if any(touched_parts.get(s.entry, (False, False))[part] for s in slots):
                    changed += self._update_layer(target)
        return changed

    def coverage(
        self, resolved: list[tuple[LoraEntry, float, float]], scheduled: Sequence[bool] = ()
    ) -> list[LoraCoverage]:
        """The coverage report of each LoRA of a stack with a weight, against this model.

        Args:
            resolved: as for `apply`.
            scheduled: as for `apply` (a scheduled LoRA is reported even at weight 0).
        Returns:
            One report per LoRA with a non-zero weight, in stack order. Files that cannot
            be read are left out (applying them raises with the reason).
        """
        return self.coverage_paths(
            [
                StackEntry(e.path, e.name, u, t, scheduled=i < len(scheduled) and scheduled[i])
                for i, (e, u, t) in enumerate(resolved)
                if not e.error
            ]
        )

    def coverage_paths(self, stack: Sequence[StackItem]) -> list[LoraCoverage]:
        """`coverage` for stack entries or (path, display name, unet weight, te weight)."""
        reports = []
        for entry in map(_entry, stack):
            if entry.unet == 0 and entry.te == 0 and not entry.scheduled:
                continue
            try:
                parsed = self.cache.get(entry.path)
            except UnusableFileError:
                continue
            reports.append(self.report(parsed, LoraFileCache.key(entry.path), entry.name))
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
            self._plan([StackEntry(path, name, 1.0, 1.0)])
        except UnusableFileError as error:
            return error.message
        return None

    def restore(self) -> None:
        """Put every touched layer back to its base weight and forget the backups."""
        with torch.no_grad():
            for target in list(self._applied):
                self._restore_layer(target)
        self._backup.clear()
        self._entries, self._slots, self._factors, self._buffer = [], {}, {}, None

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

    def _plan(self, stack: list[StackEntry]) -> _Plan:
        plan = _Plan()
        family = self.architecture.family
        for index, entry in enumerate(stack):
            if entry.unet == 0 and entry.te == 0 and not entry.scheduled:
                continue
            key = LoraFileCache.key(entry.path)
            parsed = self.cache.get(entry.path)
            check_compatible(parsed, family, entry.name)
            resolution = self.resolve(parsed, key)
            report = self.report(parsed, key, entry.name)
            if not resolution.targets:
                raise UnusableFileError(
                    f"LoRA '{entry.name}' matches no layer of this {family} model: "
                    f"{report.details()}",
                    field="loras",
                )
            lbw = None if entry.blocks is None else entry.blocks.values(family)
            plan.coverage.append(report)
            if not report.complete:
                plan.warnings.append(report.summary())
            if parsed.architecture.disagreement:
                plan.warnings.append(f"LoRA '{entry.name}': {parsed.architecture.disagreement}")
            for group_key, target in resolution.targets.items():
                ratio = layer_ratio(
                    entry.blocks,
                    lbw,
                    target.is_text_encoder,
                    "" if target.is_text_encoder else unet_region(target.module),
                    self.index.ldm_names.get(target),
                )
                plan.slots.setdefault(target, []).append(
                    _Slot(index, parsed, key, group_key, target.is_text_encoder, ratio)
                )
        return plan

    def _items(self, target: Target) -> list[tuple[ParsedLora, Contribution]]:
        """The contributions the current entries make to `target`, in stack order: each
        group's multiplier is its part's weight times the layer's block ratio (0: absent)."""
        items = []
        for slot in self._slots.get(target, ()):
            entry = self._entries[slot.entry]
            weight = entry.te if slot.is_text_encoder else entry.unet
            multiplier = float(weight * slot.ratio)
            if multiplier != 0:
                items.append((slot.parsed, (slot.key, slot.group_key, multiplier)))
        return items

    def _update_layer(self, target: Target) -> int:
        """Make one layer base + its current contributions; 1 if it had to change."""
        items = self._items(target)
        wanted = tuple(c for _, c in items)
        if self._applied.get(target, ()) == wanted:
            return 0
        if not items:
            self._restore_layer(target)
        else:
            self._merge_layer(target, items)
        return 1

    def _restore_layer(self, target: Target) -> None:
        module = self.index.modules[target]
        weight, bias = stored_weight(module), stored_bias(module)
        base_weight, base_bias = self._backup[target]
        weight.copy_(base_weight, non_blocking=True)  # async from a pinned backup
        if bias is not None and base_bias is not None:
            bias.copy_(base_bias, non_blocking=True)
        self._applied.pop(target, None)

    def _merge_layer(self, target: Target, items: list[tuple[ParsedLora, Contribution]]) -> None:
        """weight = base + each contribution in stack order, summed in fp32 on the layer's
        device, with the same operations (so the same bits) as building each update with
        `module_delta`. What a merge avoids: converting and copying a plain LoRA's
        factors (kept for the stack), a full-size allocation per update (one scratch
        buffer), the fp32 sum's own copy (an fp32 weight is the sum), and host waits on
        copies to the device (pinned backups on CUDA)."""
        module = self.index.modules[target]
        weight, bias = stored_weight(module), stored_bias(module)
        if target not in self._backup:
            self._backup[target] = (host_copy(weight), None)
        self._backup.move_to_end(target)
        base_weight, base_bias = self._backup[target]
        touches_bias = any(
            {"diff_b", "b_norm"} & set(parsed.groups[group_key].parts)
            for parsed, (_key, group_key, _m) in items
        )
        if touches_bias and bias is not None and base_bias is None:
            # the bias is still the base one: only a backed-up bias is ever changed
            base_bias = host_copy(bias)
            self._backup[target] = (base_weight, base_bias)
        device = weight.device
        # fp32 base on the device (the backup itself when it is one already: read only)
        base = base_weight.to(device, non_blocking=True).to(torch.float32)
        in_place = weight.dtype == torch.float32 and not touches_bias
        total = weight.copy_(base) if in_place else base.clone()
        base_b = None
        if base_bias is not None:
            base_b = base_bias.to(device, non_blocking=True).to(torch.float32)
        total_b = None if base_b is None else base_b.clone()
        try:
            for parsed, (key, group_key, multiplier) in items:
                group = parsed.groups[group_key]
                factors = self._lora_factors(key, group, device)
                if factors is not None:
                    add_lora(total, group.key, factors, multiplier, self._scratch(total))
                    continue
                delta, bias_delta = module_delta(group, base, multiplier, base_b)
                total += delta
                if bias_delta is not None and total_b is not None:
                    total_b += bias_delta
        except ValueError as error:
            if in_place:  # half-merged: back to base, as a layer no stack touches
                self._restore_layer(target)
            raise UnusableFileError(f"{parsed.source}: {error}", field="loras") from error
        if not in_place:
            weight.copy_(total)  # rounded to the layer's dtype on the way
        if bias is not None and total_b is not None:
            bias.copy_(total_b)
        self._applied[target] = tuple(c for _, c in items)

    def _scratch(self, like: torch.Tensor) -> torch.Tensor:
        """A flat fp32 buffer on `like`'s device with room for one update of its size,
        reused by every merge (a fresh full-size tensor per update costs page faults)."""
        buffer = self._buffer
        if buffer is None or buffer.device != like.device or buffer.numel() < like.numel():
            buffer = self._buffer = torch.empty(
                like.numel(), dtype=torch.float32, device=like.device
            )
        return buffer

    def _lora_factors(
        self, key: tuple[str, int, int], group: Group[torch.Tensor], device: torch.device
    ) -> LoraFactors | None:
        """A plain LoRA group's fp32 factors on `device`, converted and copied once per
        stack (a weight change re-merges from them), None for other kinds."""
        slot = (key, group.key, str(device))
        if slot not in self._factors:
            self._factors[slot] = lora_factors(group, device)
        return self._factors[slot]
