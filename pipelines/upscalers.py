"""Model upscalers (ESRGAN, Real-ESRGAN, SwinIR, DAT, HAT and whatever else spandrel
recognises) and A1111's upscale loop (`modules/upscaler.py`, `modules/upscaler_utils.py`).

Files are read by our safe loader (safetensors, or pickles with `weights_only`); spandrel
only recognises the architecture in the tensors and builds the network. Images go through
the network in A1111's tiles (192 px, 8 px overlap, blended back by `combine_grid`), so any
size fits in memory; unlike A1111, which hands the network BGR pixels, we hand it RGB, as
spandrel, ComfyUI and chaiNNer do (the models are trained on RGB).
"""

from __future__ import annotations

import enum
import importlib
import importlib.util
import sys
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from pipelines.errors import InvalidRequestError, NotFoundError, UnusableFileError
from pipelines.imageops import Grid, Tile, combine_grid, split_grid
from pipelines.safeload import load_pickle, load_state_dict

if TYPE_CHECKING:
    from pipelines.folders.registry import ModelFolders

BUILTIN_UPSCALERS = ("None", "Lanczos", "Nearest")
"""A1111's upscalers that need no file, in A1111's order (they list first)."""
TILE_SIZE = 192
TILE_OVERLAP = 8
"""A1111's `ESRGAN_tile` and `ESRGAN_tile_overlap` defaults."""
SPANDREL_INSTALL = "pip install --no-deps spandrel==0.4.2"

_import_lock = threading.Lock()


def _torchvision_stand_in() -> dict[str, types.ModuleType]:
    """The three torchvision names spandrel's LaMa (an inpainter) and RestoreFormer (a face
    restorer) import at import time; neither is an upscaler we run, so each raises."""

    def unavailable(*_: object, **__: object) -> Any:
        raise RuntimeError("this spandrel architecture needs torchvision, which is not installed")

    class InterpolationMode(enum.Enum):
        NEAREST = "nearest"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"

    functional = types.ModuleType("torchvision.transforms.functional")
    functional.InterpolationMode = InterpolationMode  # type: ignore[attr-defined]
    functional.rotate = unavailable  # type: ignore[attr-defined]
    functional.normalize = unavailable  # type: ignore[attr-defined]
    transforms = types.ModuleType("torchvision.transforms")
    transforms.functional = functional  # type: ignore[attr-defined]
    root = types.ModuleType("torchvision")
    root.transforms = transforms  # type: ignore[attr-defined]
    return {
        "torchvision": root,
        "torchvision.transforms": transforms,
        "torchvision.transforms.functional": functional,
    }


def import_spandrel() -> Any:
    """spandrel, imported once (lazily: only model upscalers need it).

    spandrel imports torchvision for two architectures that are not upscalers; the CPU
    install has no torchvision that runs beside its torch, so there a stand-in lends those
    names for the import only and is taken away again (nothing else sees a torchvision).

    Raises:
        ImportError: spandrel is not installed (the message says how to install it).
    """
    with _import_lock:
        if "spandrel" in sys.modules:
            return sys.modules["spandrel"]
        if importlib.util.find_spec("spandrel") is None:
            raise ImportError(f"spandrel is not installed ({SPANDREL_INSTALL})")
        if importlib.util.find_spec("torchvision") is not None:
            return importlib.import_module("spandrel")
        stand_in = _torchvision_stand_in()
        sys.modules.update(stand_in)
        try:
            return importlib.import_module("spandrel")
        finally:
            for name in stand_in:
                sys.modules.pop(name, None)


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors, unwrapped as spandrel expects (`params_ema`, `params`, ...)."""
    if path.suffix.lower() == ".safetensors":
        return load_state_dict(path)
    obj = load_pickle(path, mmap=False)
    if not isinstance(obj, dict):
        raise UnusableFileError(f"{path.name}: holds a {type(obj).__name__}, not weights")
    canonical = import_spandrel().canonicalize_state_dict(obj)
    return {k: v for k, v in canonical.items() if isinstance(v, torch.Tensor)}


def load_upscaler(path: Path) -> Any:
    """An `ImageModelDescriptor` for an upscaler file, on the CPU in float32.

    Raises:
        UnusableFileError: unreadable, not an architecture spandrel knows, or not an
            image-to-image upscaler (face restorers and inpainters are refused by name).
    """
    try:
        spandrel = import_spandrel()
    except ImportError as error:
        raise UnusableFileError(f"{path.name}: cannot be used: {error}") from None
    state = _state_dict(path)
    if not state:
        raise UnusableFileError(f"{path.name}: holds no tensors")
    try:
        descriptor = spandrel.ModelLoader(device="cpu").load_from_state_dict(state)
    except spandrel.UnsupportedModelError:
        raise UnusableFileError(
            f"{path.name}: not an upscaler architecture spandrel recognises "
            f"({len(state)} tensors, first key {next(iter(state))!r})"
        ) from None
    except Exception as error:  # a known architecture with inconsistent tensors
        raise UnusableFileError(f"{path.name}: cannot be built ({error})") from None
    arch = descriptor.architecture.name
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise UnusableFileError(f"{path.name}: {arch} is an inpainting model, not an upscaler")
    if descriptor.purpose == "FaceSR":
        raise UnusableFileError(
            f"{path.name}: {arch} is a face restoration model; face restoration is not supported"
        )
    if descriptor.input_channels != 3 or descriptor.output_channels != 3:
        raise UnusableFileError(
            f"{path.name}: {arch} takes {descriptor.input_channels} and gives "
            f"{descriptor.output_channels} channels; upscalers here work on RGB"
        )
    return descriptor.eval()


def _to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def _to_image(tensor: torch.Tensor) -> Image.Image:
    array = tensor.squeeze(0).float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.round(array * 255.0).astype(np.uint8), "RGB")


def run_model(
    descriptor: Any,
    image: Image.Image,
    *,
    device: torch.device,
    dtype: torch.dtype,
    tile_size: int = TILE_SIZE,
    tile_overlap: int = TILE_OVERLAP,
    stop: Callable[[], bool] = lambda: False,
) -> Image.Image:
    """One pass of the network over `image`, in A1111's overlapping tiles
    (`upscale_with_model`). Once `stop()` is true (interrupt), the remaining tiles are
    only Lanczos-resized, so the image comes back whole and soon."""
    image = image.convert("RGB")
    scale = descriptor.scale

    def one(tile: Image.Image) -> Image.Image:
        if stop():
            return tile.resize((tile.width * scale, tile.height * scale), Image.Resampling.LANCZOS)
        with torch.inference_mode():
            return _to_image(descriptor(_to_tensor(tile).to(device=device, dtype=dtype)))

    if tile_size <= 0 or (image.width <= tile_size and image.height <= tile_size):
        return one(image)
    tile_w, tile_h = min(tile_size, image.width), min(tile_size, image.height)
    overlap = min(tile_overlap, tile_w - 1, tile_h - 1)
    grid = split_grid(image, tile_w, tile_h, overlap)
    rows = [
        (y * scale, [Tile(t.x * scale, t.y * scale, one(t.image)) for t in tiles])
        for y, tiles in grid.rows
    ]
    return combine_grid(
        Grid(
            rows,
            tile_w * scale,
            tile_h * scale,
            grid.width * scale,
            grid.height * scale,
            overlap * scale,
        )
    )


@dataclass(frozen=True)
class Upscaling:
    """Where model upscalers run, and the registry that names their files."""

    folders: ModelFolders
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32  # the engine's; used where the network supports it
    stop: Callable[[], bool] = lambda: False

    def names(self) -> list[str]:
        """A1111's `sd_upscalers` order: the built-in ones, then usable files by name."""
        usable = [e.name for e in self.folders.entries("upscaler") if not e.error]
        return [*BUILTIN_UPSCALERS, *sorted(usable, key=str.lower)]

    def check(self, name: str, field: str) -> None:
        """Refuse a name that is neither built in nor a usable file (422/404/400)."""
        if name in BUILTIN_UPSCALERS:
            return
        try:
            entry = self.folders.resolve("upscaler", name)
        except NotFoundError as error:
            raise InvalidRequestError(
                f"{field}: {name!r} is not a known upscaler; known: {', '.join(self.names())}",
                field=field,
            ) from error
        if entry.error:
            raise UnusableFileError(f"{field}: upscaler {name!r} is unusable: {entry.error}")

    def upscale(self, image: Image.Image, scale: float, name: str) -> Image.Image:
        """A1111's `Upscaler.upscale`: up to three passes of the upscaler until the image
        covers `scale` times its size rounded down to 8, then Lanczos to exactly that."""
        dest = (int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8))
        one_pass = self._pass(name, scale)
        for _ in range(3):
            shape = image.size
            image = one_pass(image)
            if image.size == shape or (image.width >= dest[0] and image.height >= dest[1]):
                break
        if image.size != dest:
            image = image.resize(dest, Image.Resampling.LANCZOS)
        return image

    def resize(self, image: Image.Image, width: int, height: int, name: str) -> Image.Image:
        """A1111's `images.resize_image(0, ...)` with an upscaler: "None" is one Lanczos
        resize; any other upscaler enlarges by the covering scale, then Lanczos fits."""
        if name == "None" or image.mode == "L":
            return image.resize((width, height), Image.Resampling.LANCZOS)
        scale = max(width / image.width, height / image.height)
        if scale > 1.0:
            image = self.upscale(image, scale, name)
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.LANCZOS)
        return image

    def _pass(self, name: str, scale: float) -> Callable[[Image.Image], Image.Image]:
        if name == "None":
            return lambda image: image
        if name in ("Lanczos", "Nearest"):
            method = Image.Resampling.LANCZOS if name == "Lanczos" else Image.Resampling.NEAREST
            return lambda image: image.resize(
                (int(image.width * scale), int(image.height * scale)), method
            )
        self.check(name, "upscaler")
        descriptor = self._network(self.folders.resolve("upscaler", name))
        dtype = self.dtype
        if not (
            (dtype == torch.float16 and descriptor.supports_half)
            or (dtype == torch.bfloat16 and descriptor.supports_bfloat16)
        ):
            dtype = torch.float32
        descriptor.to(device=self.device, dtype=dtype)
        return lambda image: run_model(
            descriptor, image, device=self.device, dtype=dtype, stop=self.stop
        )

    @staticmethod
    def _network(entry: Any) -> Any:
        """The entry's network; the last one used stays loaded (they are small, and a
        batch or a hires run uses the same one again and again)."""
        key = (entry.path, entry.size, entry.mtime_ns)
        with _network_lock:
            if _last_network and _last_network[0] == key:
                return _last_network[1]
            _last_network.clear()
        descriptor = load_upscaler(entry.path)
        with _network_lock:
            _last_network[:] = [key, descriptor]
        return descriptor


_network_lock = threading.Lock()
_last_network: list[Any] = []
