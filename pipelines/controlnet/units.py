"""ControlNet units as a step of a generation run, as sd-webui-controlnet 1.1.455 runs them
(`scripts/controlnet.py` `controlnet_main_entry`/`get_control`, `scripts/hook.py`).

Before denoising, each unit's image (its own, else img2img's init image with img2img's resize
mode) goes through its preprocessor at the processor resolution (pixel perfect: the one that
maps the image onto the target size), and the map is fitted to the generation size by the
unit's resize mode (`preprocessors.fit_map`); that map, in [0, 1], is the ControlNet's hint.

At each UNet call, every unit whose guidance range holds the step runs its ControlNet on the
UNet's own input, timestep, text conditioning (and SDXL's size conditioning). The range is
sd-webui-controlnet's `guidance_schedule_handler`: the unit acts while `start <= s / steps <=
end`, where `steps` are the pass's sampler steps and `s` is A1111's `state.sampling_step`.
A1111 sets that from the sampler's callback, which runs after each step's model calls, so the
model calls of step k (from 0) see `s = max(k - 1, 0)`: with 20 steps and guidance end 0.5
the unit acts in steps 0 to 11. `a1111_sampling_step` is that rule, kept so the same
settings give A1111's images. Its residuals, one per UNet skip connection and
one for the middle block, are scaled and summed over the units, then added to the UNet's:

- Balanced: every residual times the weight;
- My prompt is more important: "soft injection", residual i (of 13 for SD1/SD2: 12 skips and
  the middle) times weight * 0.825 ** (12 - i); SDXL's 10 take the first 10 of these scales,
  as sd-webui-controlnet does;
- ControlNet is more important: the soft scales, and only the conditioned rows of the UNet
  batch get the residuals ("cfg injection": the uncond pass runs without control, so CFG
  pushes towards the control).

In the second pass of hires fix the hint is made at the hires size from the same map, and
units whose module is canny or mlsd use the soft scales there (sd-webui-controlnet's
"forced soft injection"); `hr_option` picks the passes a unit acts in. The refiner's steps run
without units (sd-webui-controlnet hooks the first model only).

A unit whose model is an IP-Adapter (`pipelines.controlnet.ipadapter`) has no residuals: it
is prepared into image tokens, and at each UNet call the same hook sets the tokens for the
batch's rows and the weight in force (0 outside its guidance range) that the installed
attention reads (`ControlUnits.attention`, around each pass's denoising).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipelines.controlnet.annotators import Annotators
from pipelines.controlnet.faceid import NoFaceError
from pipelines.controlnet.ipadapter import (
    HIDDEN_STATES,
    AdapterTokens,
    Encoder,
    IPAdapter,
    adapter_kind,
    clip_pixels,
    decoupled_processors,
    encoder_roots,
    find_encoder,
    installed,
    load_encoder,
    load_ipadapter,
)
from pipelines.controlnet.models import ControlNetCache
from pipelines.controlnet.preprocessors import (
    FACE_ENCODER,
    Preprocessor,
    fit_map,
    hwc3,
    pixel_perfect_resolution,
)
from pipelines.errors import InvalidRequestError, LorastackError, UnusableFileError
from pipelines.folders.controlnets import (
    IPADAPTER_LAYOUT,
    ControlNetEntry,
    facts_from_shapes,
    file_shapes,
)
from pipelines.folders.registry import ModelFolders
from pipelines.imageops import resize_image
from pipelines.schema import CONTROL_RESIZE_MODES, ControlNetUnit, GenerationRequest

SOFT_BASE = 0.825
"""sd-webui-controlnet's soft-injection factor: residual i of 13 is scaled by 0.825**(12-i)."""
Residuals = tuple[list[torch.Tensor], torch.Tensor]
ResidualHook = Callable[
    [torch.Tensor, torch.Tensor, int, torch.Tensor, dict[str, torch.Tensor] | None],
    Residuals | None,
]
"""(ControlNet input [rows, 4, h, w], timestep, step index, hidden states, added cond kwargs)
-> the summed residuals for the UNet, or None when no unit acts at that step."""


def unit_field(index: int, name: str) -> str:
    return f"controlnet[{index}].{name}"


def a1111_sampling_step(step: int) -> int:
    """A1111's `state.sampling_step` during the model calls of sampler step `step` (from 0):
    the last finished step's index, 0 before any (see the module docstring)."""
    return max(step - 1, 0)


def soft_scales(weight: float, count: int) -> list[float]:
    """`count` residual scales (skips, then the middle block) of soft injection: the first
    `count` of sd-webui-controlnet's 13."""
    scales = [weight * SOFT_BASE ** float(12 - i) for i in range(13)]
    if count > len(scales):
        scales = [weight * SOFT_BASE ** float(count - 1 - i) for i in range(count)]
    return scales[:count]


def check_unit_names(
    units: tuple[ControlNetUnit, ...],
    folders: ModelFolders,
    family: str | None,
    annotators: Annotators | None = None,
) -> tuple[ControlNetUnit, ...]:
    """The units with their model names as listed keys: module known, model listed, usable,
    and (when its family is known) for the checkpoint's family. Raises 4xx errors naming the
    unit's field."""
    annotators = annotators or Annotators(folders.roots["controlnet"])
    checked = []
    for index, unit in enumerate(units):
        preprocessor = annotators.find(unit.module, unit_field(index, "module"))
        entry = unit_model(folders, unit.model, index, preprocessor)
        check_pairing(index, preprocessor, entry)
        if entry.layout == IPADAPTER_LAYOUT:
            adapter_encoder(folders, entry, preprocessor, index, annotators)
        if family is not None and entry.family is not None and entry.family != family:
            raise InvalidRequestError(
                f"{unit_field(index, 'model')}: ControlNet model '{entry.title}' is for "
                f"{entry.family} and the checkpoint is {family}; use a ControlNet made for "
                f"{family}",
                field=unit_field(index, "model"),
            )
        checked.append(unit)
    return tuple(checked)


def check_pairing(index: int, preprocessor: Preprocessor, entry: ControlNetEntry) -> None:
    """IP-Adapter models take an `ip-adapter_clip_*` module (FaceID ones
    `ip-adapter_face_id`) and ControlNets any other."""
    where = unit_field(index, "module")
    if entry.layout == IPADAPTER_LAYOUT and preprocessor.encoder is None:
        raise InvalidRequestError(
            f"{where}: '{entry.title}' is an IP-Adapter; its module is an image encoder "
            f"(ip-adapter_clip_sd15, ip-adapter_clip_sdxl, ip-adapter_face_id, ...), not "
            f"'{preprocessor.name}'",
            field=where,
        )
    if entry.layout == IPADAPTER_LAYOUT:
        faceid = adapter_kind(entry) == "faceid"
        if faceid != (preprocessor.encoder == FACE_ENCODER):
            wanted = "ip-adapter_face_id" if faceid else "an ip-adapter_clip_* module"
            raise InvalidRequestError(
                f"{where}: '{entry.title}' is an IP-Adapter{' FaceID' if faceid else ''}; "
                f"its module is {wanted}, not '{preprocessor.name}'",
                field=where,
            )
    if entry.layout != IPADAPTER_LAYOUT and preprocessor.encoder is not None:
        raise InvalidRequestError(
            f"{where}: '{preprocessor.name}' is for IP-Adapter models and '{entry.title}' is "
            "a ControlNet",
            field=where,
        )


def adapter_encoder(
    folders: ModelFolders,
    entry: ControlNetEntry,
    preprocessor: Preprocessor,
    index: int,
    annotators: Annotators,
) -> Encoder | None:
    """The image encoder an IP-Adapter unit will use (None for FaceID, whose face embedder
    must be able to run); its absence names the unit's model."""
    try:
        if preprocessor.encoder == FACE_ENCODER:
            face_embedder_ready(entry, annotators)
            return None
        return find_encoder(entry, encoder_roots(folders.roots["controlnet"]), preprocessor.encoder)
    except UnusableFileError as error:
        rename(error, unit_field(index, "model"))
        raise


def face_embedder_ready(entry: ControlNetEntry, annotators: Annotators) -> None:
    """Raises UnusableFileError naming what a FaceID adapter needs that is not here."""
    problem = annotators.face_problem()
    if problem is not None:
        raise UnusableFileError(f"IP-Adapter FaceID '{entry.title}': {problem}", field="controlnet")


def listed_models(folders: ModelFolders, annotators: Annotators) -> list[ControlNetEntry]:
    """The ControlNet folder's models; an IP-Adapter whose image encoder is not in
    `clip_vision/` (FaceID: whose face embedder cannot run) is listed unusable, with what
    it needs."""
    roots = encoder_roots(folders.roots["controlnet"])
    listed = []
    for entry in folders.entries("controlnet"):
        if entry.layout == IPADAPTER_LAYOUT and entry.error is None:
            try:
                if adapter_kind(entry) == "faceid":
                    face_embedder_ready(entry, annotators)
                else:
                    find_encoder(entry, roots, None)
            except UnusableFileError as error:
                entry = replace(entry, error=error.message)
        listed.append(entry)
    return listed


def rename(error: LorastackError, where: str) -> None:
    """Name a unit's field in an error raised about its model."""
    error.field = where
    error.message = f"{where}: {error.message}"
    error.args = (error.message,)


def resolve_model(folders: ModelFolders, name: str, index: int) -> ControlNetEntry:
    """A unit's model: a listed, usable ControlNet."""
    where = unit_field(index, "model")
    if not name.strip() or name.strip() == "None":
        raise InvalidRequestError(
            f"{where}: no ControlNet model selected (model is None)", field=where
        )
    try:
        entry: ControlNetEntry = folders.resolve("controlnet", name)
    except LorastackError as error:  # unknown (404) or ambiguous: name the unit's field
        rename(error, where)
        raise
    if entry.error:
        raise UnusableFileError(f"{where}: {entry.error}", field=where)
    return entry


def unit_model(
    folders: ModelFolders, name: str, index: int, preprocessor: Preprocessor
) -> ControlNetEntry:
    """A unit's model (`resolve_model`); a pickle not read yet is read now when the module
    is an IP-Adapter's (h94 publishes FaceID adapters as `.bin`), so the unit is run as
    what the file is and the listing learns it."""
    entry = resolve_model(folders, name, index)
    if entry.layout is not None or entry.kind != "single" or preprocessor.encoder is None:
        return entry
    where = unit_field(index, "model")
    try:
        facts = facts_from_shapes(entry.path.name, file_shapes(entry))
    except UnusableFileError as error:
        rename(error, where)
        raise
    entry = folders.learn(
        "controlnet", entry, layout=facts.layout, family=facts.family, error=facts.error
    )
    if entry.error:
        raise UnusableFileError(f"{where}: {entry.error}", field=where)
    return entry


@dataclass
class PreparedUnit:
    """One unit made ready for a run: its model, its map and the hint at each size."""

    index: int
    unit: ControlNetUnit
    entry: ControlNetEntry
    preprocessor: Preprocessor
    resize_mode: str
    processor_res: int
    threshold_a: float
    threshold_b: float
    detected: np.ndarray  # the preprocessor's map, before fitting
    model: Any
    hints: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    maps: list[Image.Image] = field(default_factory=list)

    @property
    def cond_only(self) -> bool:
        """Only the conditioned rows get residuals: ControlNet is more important, or a
        model whose conditions are pooled (shuffle)."""
        pooled = bool(getattr(self.model.config, "global_pool_conditions", False))
        return self.unit.control_mode == "ControlNet is more important" or pooled

    def scales(self, count: int, hires: bool) -> list[float]:
        weight = self.unit.weight
        soft = self.unit.control_mode != "Balanced"
        forced = hires and any(name in self.preprocessor.name for name in ("canny", "mlsd"))
        return soft_scales(weight, count) if soft or forced else [weight] * count

    def acts(self, fraction: float, hires: bool) -> bool:
        return unit_acts(self.unit, fraction, hires)

    def infotext(self) -> str:
        return unit_infotext(
            self.unit,
            self.preprocessor,
            self.entry,
            self.resize_mode,
            self.processor_res,
            self.threshold_a,
            self.threshold_b,
        )


def unit_acts(unit: ControlNetUnit, fraction: float, hires: bool) -> bool:
    """Whether a unit acts at `fraction` of the pass's steps, in this pass."""
    if fraction < unit.guidance_start or fraction > unit.guidance_end:
        return False
    if unit.hr_option == "Low res only":
        return not hires
    if unit.hr_option == "High res only":
        return hires
    return True


def unit_infotext(
    unit: ControlNetUnit,
    preprocessor: Preprocessor,
    entry: ControlNetEntry,
    resize_mode: str,
    processor_res: int,
    threshold_a: float,
    threshold_b: float,
) -> str:
    """sd-webui-controlnet's `ControlNetUnit.serialize`: its infotext fields as
    `Display Name: value` pairs (the effective slider values)."""
    values: list[tuple[str, object]] = [
        ("Module", preprocessor.name),
        ("Model", entry.title),
        ("Weight", float(unit.weight)),
        ("Resize Mode", resize_mode),
        ("Processor Res", processor_res),
        ("Threshold A", float(threshold_a)),
        ("Threshold B", float(threshold_b)),
        ("Guidance Start", float(unit.guidance_start)),
        ("Guidance End", float(unit.guidance_end)),
        ("Pixel Perfect", unit.pixel_perfect),
        ("Control Mode", unit.control_mode),
    ]
    return ", ".join(f"{name}: {value}" for name, value in values)


@dataclass
class PreparedAdapter:
    """One IP-Adapter unit made ready for a run: its adapter and image tokens."""

    index: int
    unit: ControlNetUnit
    entry: ControlNetEntry
    preprocessor: Preprocessor
    adapter: IPAdapter
    cond: torch.Tensor  # [1, tokens, width]: the image's tokens
    uncond: torch.Tensor  # [1, tokens, width]: a zero embedding's tokens

    def rows(self, rows: int, uncond_rows: int) -> torch.Tensor:
        """Tokens for a UNet batch of `rows`, the first `uncond_rows` unconditioned."""
        # [1, n, width] -> [rows, n, width]
        return torch.cat(
            [
                self.uncond.expand(uncond_rows, -1, -1),
                self.cond.expand(rows - uncond_rows, -1, -1),
            ]
        )

    def infotext(self) -> str:
        preprocessor, unit = self.preprocessor, self.unit
        return unit_infotext(
            unit,
            preprocessor,
            self.entry,
            unit.resize_mode,
            int(preprocessor.resolution.effective(unit.processor_res)),
            preprocessor.slider_1.effective(unit.threshold_a),
            preprocessor.slider_2.effective(unit.threshold_b),
        )


MaskCrop = tuple[tuple[int, int], tuple[int, int, int, int]]
"""Inpainting "only masked": (the init image's size, the crop box (x1, y1, x2, y2) in it)."""


def resize_mode_of(unit: ControlNetUnit, init_resize: str) -> str:
    """The unit's resize mode; a unit on the init image takes img2img's."""
    return unit.resize_mode if unit.image is not None else init_resize


def crop_source(
    source: np.ndarray, resize_mode: str, crop: MaskCrop, request: GenerationRequest
) -> np.ndarray:
    """sd-webui-controlnet's only-masked crop: the image fitted to the init image's size by
    the unit's resize mode, cropped to the box, then fitted to the generation size by
    "Resize and Fill" (A1111's `resize_image` modes)."""
    (width, height), box = crop
    mode = CONTROL_RESIZE_MODES.index(resize_mode)
    image = resize_image(mode, Image.fromarray(source), width, height).crop(box)
    return np.asarray(resize_image(2, image, request.width, request.height))


def unit_source(unit: ControlNetUnit, init: Image.Image | None) -> np.ndarray | None:
    """sd-webui-controlnet's `choose_input_image` for one RGB image: the unit's image (a
    mask that is neither all black nor all white replaces it: "canvas scribble"), else
    img2img's init image."""
    if unit.image is None:
        return None if init is None else hwc3(np.asarray(init.convert("RGB")))
    image = hwc3(np.asarray(unit.image.convert("RGB")))
    if unit.mask is None:
        return image
    mask = np.asarray(unit.mask.convert("L").resize((image.shape[1], image.shape[0])))
    if (mask <= 5).all() or (mask >= 250).all():
        return image
    return hwc3(mask)


class ControlUnits:
    """A run's prepared units and the residual hook for its denoising loop.

    Example:
        >>> units = ControlUnits.prepare(request, folders, cache, unet, device, dtype,
        ...                              init=None, init_resize="Crop and Resize")
        ... # doctest: +SKIP
        >>> loop.residuals = units.hook(count=1, guided=True, width=512, height=512,
        ...                             steps=20, order=1, hires=False)  # doctest: +SKIP
    """

    def __init__(
        self,
        units: list[PreparedUnit],
        device: torch.device,
        dtype: torch.dtype,
        adapters: Sequence[PreparedAdapter] = (),
    ):
        self.units = units
        self.device = device
        self.dtype = dtype
        self.adapters = list(adapters)
        self.tokens = AdapterTokens()
        self._processors: dict[str, Any] | None = None

    @classmethod
    def prepare(
        cls,
        request: GenerationRequest,
        folders: ModelFolders,
        cache: ControlNetCache,
        unet: Any,
        device: torch.device,
        dtype: torch.dtype,
        *,
        init: Image.Image | None = None,
        init_resize: str = "Crop and Resize",
        learn: Callable[[ControlNetEntry], Callable[..., None]] | None = None,
        crop: MaskCrop | None = None,
        annotators: Annotators | None = None,
    ) -> ControlUnits:
        """Resolve, preprocess and load every unit of `request` (its `controlnet`); with
        `crop` (inpainting "only masked"), units' images are cropped as the init image;
        preprocessors with weights run on `annotators`' device (default: `device`)."""
        annotators = annotators or Annotators(folders.roots["controlnet"], device)
        prepared = []
        adapters = []
        for index, unit in enumerate(request.controlnet):
            preprocessor = annotators.find(unit.module, unit_field(index, "module"))
            entry = unit_model(folders, unit.model, index, preprocessor)
            check_pairing(index, preprocessor, entry)
            source = unit_source(unit, init)
            if source is None:
                raise InvalidRequestError(
                    f"{unit_field(index, 'image')}: the unit has no image (txt2img needs one; "
                    "img2img uses the init image when it has none)",
                    field=unit_field(index, "image"),
                )
            if crop is not None and unit.inpaint_crop_input_image:
                source = crop_source(source, resize_mode_of(unit, init_resize), crop, request)
            if entry.layout == IPADAPTER_LAYOUT:
                adapters.append(
                    prepare_adapter(
                        index,
                        unit,
                        entry,
                        preprocessor,
                        source,
                        folders,
                        cache,
                        unet,
                        device,
                        annotators,
                    )
                )
                continue
            resize_mode = resize_mode_of(unit, init_resize)
            resolution = preprocessor.resolution.effective(unit.processor_res)
            if unit.pixel_perfect:
                resolution = pixel_perfect_resolution(
                    source, request.height, request.width, resize_mode
                )
            threshold_a = preprocessor.slider_1.effective(unit.threshold_a)
            threshold_b = preprocessor.slider_2.effective(unit.threshold_b)
            detected = preprocessor(source, max(int(resolution), 1), threshold_a, threshold_b)
            try:
                model = cache.get(
                    entry, unet, device, dtype, learn(entry) if learn is not None else None
                )
            except UnusableFileError as error:
                rename(error, unit_field(index, "model"))
                raise
            prepared.append(
                PreparedUnit(
                    index,
                    unit,
                    entry,
                    preprocessor,
                    resize_mode,
                    int(resolution),
                    threshold_a,
                    threshold_b,
                    detected,
                    model,
                )
            )
        return cls(prepared, device, dtype, adapters)

    def hint(self, prepared: PreparedUnit, width: int, height: int) -> torch.Tensor:
        """The unit's hint at a size [1, 3, H, W] in [0, 1], made once per size; the map
        is kept for the result."""
        key = (width, height)
        if key not in prepared.hints:
            fitted = fit_map(prepared.detected, prepared.resize_mode, width, height)
            if prepared.unit.save_detected_map:
                prepared.maps.append(Image.fromarray(fitted))
            pixels = torch.from_numpy(fitted.astype(np.float32) / 255.0).permute(2, 0, 1)
            prepared.hints[key] = pixels[None].to(device=self.device, dtype=self.dtype)
        return prepared.hints[key]

    def detected_maps(self) -> list[Image.Image]:
        """Every unit's fitted maps, hires ones first (sd-webui-controlnet's order)."""
        return [image for unit in self.units for image in reversed(unit.maps)]

    def infotext(self) -> dict[str, str]:
        every: list[PreparedUnit | PreparedAdapter] = [*self.units, *self.adapters]
        every.sort(key=lambda unit: unit.index)
        return {f"ControlNet {i}": unit.infotext() for i, unit in enumerate(every)}

    def attention(self, unet: Any) -> Any:
        """A context in which the IP-Adapter units' attention is installed on `unet` (a
        no-op without IP-Adapter units)."""
        if not self.adapters:
            return nullcontext()
        if self._processors is None:
            self._processors = decoupled_processors(
                unet, [unit.adapter for unit in self.adapters], self.tokens
            )
        return installed(unet, self._processors)

    def hook(
        self,
        *,
        count: int,
        guided: bool,
        width: int,
        height: int,
        steps: int,
        order: int,
        hires: bool = False,
    ) -> ResidualHook:
        """The residual hook for one pass: `count` batch items, `steps` sampler steps of
        `order` model calls each, at `width` x `height` (it also feeds the IP-Adapter
        units' attention at each call)."""
        hints = [self.hint(unit, width, height) for unit in self.units]

        def residuals(
            model_input: torch.Tensor,
            timestep: torch.Tensor,
            index: int,
            hidden: torch.Tensor,
            added: dict[str, torch.Tensor] | None,
        ) -> Residuals | None:
            fraction = a1111_sampling_step(index // max(order, 1)) / max(steps, 1)
            if self.adapters:  # what the installed IP-Adapter attention reads at this call
                rows = model_input.shape[0]
                self.tokens.scales = [
                    unit.unit.weight if unit_acts(unit.unit, fraction, hires) else 0.0
                    for unit in self.adapters
                ]
                self.tokens.tokens = [
                    unit.rows(rows, count if guided else 0) for unit in self.adapters
                ]
            total: Residuals | None = None
            for unit, hint in zip(self.units, hints, strict=True):
                if not unit.acts(fraction, hires):
                    continue
                rows = model_input.shape[0]
                down, mid = unit.model(
                    model_input[:, : unit.model.config.in_channels].to(self.dtype),
                    timestep,
                    encoder_hidden_states=hidden.to(self.dtype),
                    controlnet_cond=hint.expand(rows, -1, -1, -1),
                    conditioning_scale=1.0,
                    added_cond_kwargs=added,
                    return_dict=False,
                )
                outputs = [*down, mid]
                scales = unit.scales(len(outputs), hires)
                outputs = [output * scale for output, scale in zip(outputs, scales, strict=True)]
                if unit.cond_only and guided:
                    mark = torch.ones(rows, 1, 1, 1, device=model_input.device)
                    mark[:count] = 0  # the uncond pass comes first
                    outputs = [output * mark.to(output.dtype) for output in outputs]
                if total is None:
                    total = (outputs[:-1], outputs[-1])
                else:
                    total = (
                        [a + b for a, b in zip(total[0], outputs[:-1], strict=True)],
                        total[1] + outputs[-1],
                    )
            return total

        return residuals


def prepare_adapter(
    index: int,
    unit: ControlNetUnit,
    entry: ControlNetEntry,
    preprocessor: Preprocessor,
    source: np.ndarray,
    folders: ModelFolders,
    cache: ControlNetCache,
    unet: Any,
    device: torch.device,
    annotators: Annotators | None = None,
) -> PreparedAdapter:
    """An IP-Adapter unit: the adapter fitted to `unet`, the image's tokens (and a zero
    input's) from its encoder, or for FaceID from the face embedding `annotators` make; the
    models kept in the ControlNet cache (the face embedder in `annotators`)."""
    annotators = annotators or Annotators(folders.roots["controlnet"], device)
    encoder = adapter_encoder(folders, entry, preprocessor, index, annotators)
    fitted = repr(dict(unet.config))
    try:
        adapter = cache.remember(
            ("ipadapter", str(entry.path), entry.mtime_ns, fitted),
            lambda: load_ipadapter(entry, unet),
        )
    except UnusableFileError as error:
        rename(error, unit_field(index, "model"))
        raise
    dtype = next(unet.parameters()).dtype
    projection = adapter.projection.to(device)
    if encoder is None:  # FaceID: the face embedding of the image, and a zero one
        face = unit_face(index, source, annotators)
        embedding = torch.from_numpy(face)[None].to(device)  # [1, 512]
        with torch.no_grad():
            cond = projection(embedding)  # [1, tokens, width]
            uncond = projection(torch.zeros_like(embedding))
        return PreparedAdapter(
            index, unit, entry, preprocessor, adapter, cond.to(dtype), uncond.to(dtype)
        )
    model = cache.remember(
        ("clip_vision", str(encoder.path), str(device)),
        lambda: load_encoder(encoder).to(device),
    )
    with torch.no_grad():
        pixels = clip_pixels(source, encoder.image_size).to(device)
        if adapter.reads == HIDDEN_STATES:  # the penultimate hidden states, of image and zeros
            hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
            zeros = torch.zeros_like(pixels)
            blank = model(pixel_values=zeros, output_hidden_states=True).hidden_states[-2]
            cond = projection(hidden)  # [1, patches + 1, hidden_size] -> [1, tokens, width]
            uncond = projection(blank)
        else:
            embeds = model(pixel_values=pixels).image_embeds  # [1, projection_dim]
            cond = projection(embeds)  # [1, tokens, width]
            uncond = projection(torch.zeros_like(embeds))
    return PreparedAdapter(
        index, unit, entry, preprocessor, adapter, cond.to(dtype), uncond.to(dtype)
    )


def unit_face(index: int, source: np.ndarray, annotators: Annotators) -> np.ndarray:
    """The face embedding [512] of a FaceID unit's image; no face is a 422 naming it."""
    try:
        return annotators.face_embedding(source)
    except NoFaceError as error:
        where = unit_field(index, "image")
        raise InvalidRequestError(f"{where}: {error}", field=where) from error
    except UnusableFileError as error:
        rename(error, unit_field(index, "model"))
        raise
