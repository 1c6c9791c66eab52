"""Preprocessors with weights ("annotators"), found in `models/ControlNet/annotators/<folder>/`
beside every ControlNet folder and run on the engine's device.

`depth_midas` is MiDaS v3 DPT-Hybrid through transformers' `DPTForDepthEstimation` (its BiT
backbone is transformers' own, so neither timm nor torchvision is needed; controlnet-aux
needs both, and PyPI's torchvision does not load beside the CPU torch wheel). The weights
are in `annotators/midas/`: a transformers folder (`config.json` and `model.safetensors`, as
Intel/dpt-hybrid-midas publishes them), or sd-webui-controlnet's own file,
`dpt_hybrid-midas-501f0c75.pt`, converted when loaded (`midas_original`); the folder wins
when both are there. The map is sd-webui-controlnet's `midas`: the image
at the processor resolution with edge padding to a multiple of 64, pixels / 127.5 - 1, the
predicted depth (at the padded size: DPT's position embeddings are interpolated as MiDaS's
`forward_flex` does) normalised min..max to 0..255, the padding cut off.

`openpose` is sd-webui-controlnet's body-only OpenPose, ported in `openpose` (no
controlnet-aux, no torchvision): `annotators/openpose/body_pose_model.pth` (lllyasviel/
Annotators; read with `weights_only`) or the same tensors as `body_pose_model.safetensors`.

The face embedder of IP-Adapter FaceID units (insightface, optional: `faceid`) is kept here
too, as sd-webui-controlnet keeps it with its preprocessors.

Models are loaded once per folder, file version and device, kept until `clear` (the engine
clears them with its ControlNets when the device runs out of memory).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.controlnet.faceid import (
    FACE_FILES,
    FaceEmbedder,
    FaceModels,
    InsightFace,
    face_folder,
    face_problem,
)
from pipelines.controlnet.midas_original import midas_config, original_to_transformers
from pipelines.controlnet.openpose import (
    BODY_POSE_FILE,
    BODY_POSE_SAFETENSORS,
    BodyPoseModel,
    load_body_pose,
    openpose_map,
)
from pipelines.controlnet.preprocessors import (
    BUILT_IN,
    WEIGHTED,
    ImageArray,
    Preprocessor,
    WeightedPreprocessor,
    at_resolution,
    find_preprocessor,
    pad_to_64,
    read_annotator_file,
    sorted_preprocessors,
)
from pipelines.errors import InvalidRequestError, UnusableFileError
from pipelines.folders.controlnets import ANNOTATORS_SUBFOLDER
from pipelines.safeload import load_pickle, load_state_dict, read_safetensors_header

ORIGINAL_MIDAS = "dpt_hybrid-midas-501f0c75.pt"
"""The file sd-webui-controlnet downloads (original MiDaS key layout)."""
BODY_POSE_KEYS = ("conv1_1.weight", "Mconv7_stage6_L2.weight")
"""Tensors of OpenPose's body model, first and last (the published names)."""
MIDAS_KEYS = ("dpt.embeddings.backbone.bit.embedder.convolution.weight", "head.head.0.weight")
"""Tensors every transformers DPT-Hybrid depth model has (a BiT stem, a depth head)."""


def annotator_folders(controlnet_roots: Sequence[Path], folder: str) -> tuple[Path, ...]:
    """`annotators/<folder>/` in every ControlNet folder, in the roots' order."""
    return tuple(root / ANNOTATORS_SUBFOLDER / folder for root in controlnet_roots)


def shown(folder: Path) -> str:
    """How messages name an annotator folder: from its ControlNet folder's name on, so
    clients never see host paths (`ControlNet/annotators/midas`)."""
    return f"{folder.parent.parent.name}/{ANNOTATORS_SUBFOLDER}/{folder.name}"


def header_problem(path: Path, keys: Sequence[str], kind: str) -> str | None:
    """Why the safetensors file at `path` cannot be `kind` (None: its header holds every
    one of `keys`); the header only, so listing stays cheap."""
    name = f"{shown(path.parent)}/{path.name}"
    try:
        tensors = read_safetensors_header(path).tensors
    except UnusableFileError as error:
        return f"{shown(path.parent)}/{error}"  # the error starts with the file's name
    except OSError as error:
        return f"{name}: {error.strerror}"
    missing = [key for key in keys if key not in tensors]
    if missing:
        return f"{name}: not {kind} (no {', '.join(missing)})"
    return None


def midas_problem(folder: Path) -> str | None:
    """Why `folder` is not a usable transformers DPT-Hybrid depth model (None: it is); read
    from the config and the safetensors header only, so listing stays cheap."""
    name = shown(folder)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"{name}/config.json: not a readable JSON config ({error})"
    if not isinstance(config, dict) or config.get("model_type") != "dpt":
        return f"{name}/config.json: not a DPT config (model_type must be 'dpt')"
    if not config.get("is_hybrid"):
        return f"{name}/config.json: not DPT-Hybrid (is_hybrid is not true)"
    return header_problem(folder / "model.safetensors", MIDAS_KEYS, "a DPT depth model")


def original_problem(path: Path) -> str | None:
    """Why the original MiDaS file cannot be a torch checkpoint (None: it may be; the
    tensors are only checked when it is loaded, as reading them means unpickling)."""
    try:
        with open(path, "rb") as file:
            magic = file.read(4)
    except OSError as error:
        return f"{shown(path.parent)}/{path.name}: {error.strerror}"
    if magic != b"PK\x03\x04" and magic[:1] != b"\x80":
        return f"{shown(path.parent)}/{path.name}: not a torch checkpoint (empty or not a pickle)"
    return None


def openpose_weights(folder: Path) -> Path:
    """The body model file of `annotators/openpose/`: the `.pth`, else the `.safetensors`."""
    pth = folder / BODY_POSE_FILE
    return pth if pth.is_file() else folder / BODY_POSE_SAFETENSORS


def openpose_problem(folder: Path) -> str | None:
    """Why the body model file cannot be OpenPose's (None: it may be): the `.pth` must be a
    torch checkpoint, the `.safetensors` must hold the published keys (its header says);
    the tensors themselves are checked when it is loaded."""
    weights = openpose_weights(folder)
    if weights.name == BODY_POSE_FILE:
        return original_problem(weights)
    return header_problem(weights, BODY_POSE_KEYS, "OpenPose's body model")


def load_original_midas(path: Path) -> Any:
    """sd-webui-controlnet's MiDaS file as transformers' DPT-Hybrid (float32, CPU, eval):
    read with `weights_only`, keys converted (`midas_original`); refused naming the file."""
    from transformers import DPTForDepthEstimation

    name = f"{shown(path.parent)}/{path.name}"
    loaded = read_annotator_file("depth_midas", shown(path.parent), path, load_pickle)
    if isinstance(loaded, dict) and "optimizer" in loaded and isinstance(loaded.get("model"), dict):
        loaded = loaded["model"]  # MiDaS's loader unwraps training checkpoints the same way
    if not isinstance(loaded, dict):
        raise UnusableFileError(
            f"preprocessor depth_midas: {name}: not a dict of weights", field="module"
        )
    state = {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    try:
        model = DPTForDepthEstimation(midas_config(state))
        converted = original_to_transformers(state)
        model.load_state_dict({k: v.to(torch.float32) for k, v in converted.items()}, strict=True)
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as error:
        raise UnusableFileError(
            f"preprocessor depth_midas: {name} is not MiDaS v3 DPT-Hybrid: {error}",
            field="module",
        ) from error
    return _any_size(model.eval())


def _any_size(model: Any) -> Any:
    """Let the hybrid embeddings take any size that is a multiple of the patch size, as
    MiDaS's `forward_flex` does (transformers only interpolates the position embeddings
    when asked, and `DPTModel` never asks)."""
    embeddings = model.dpt.embeddings
    embeddings.forward = partial(
        type(embeddings).forward, embeddings, interpolate_pos_encoding=True
    )
    return model


def dpt_depth(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    """`DPTForDepthEstimation.forward` for DPT-Hybrid with the patch grid given to the neck,
    so non-square inputs work (transformers assumes a square grid for hybrids).
    [B, 3, H, W] -> [B, H, W]."""
    config = model.config
    outputs = model.dpt(pixels, output_hidden_states=True)
    layers = [
        feature
        for index, feature in enumerate(outputs.hidden_states[1:])
        if index in config.backbone_out_indices[2:]
    ]
    hidden_states = [*outputs.intermediate_activations, *layers]
    patch = config.patch_size
    height, width = pixels.shape[-2:]
    return model.head(model.neck(hidden_states, height // patch, width // patch))


def load_midas(folder: Path) -> Any:
    """The DPT-Hybrid depth model of a transformers folder (float32, CPU, eval), offline;
    a corrupt or mismatched file is an `UnusableFileError` naming it."""
    from transformers import DPTConfig, DPTForDepthEstimation

    problem = midas_problem(folder)
    if problem:
        raise UnusableFileError(f"preprocessor depth_midas: {problem}", field="module")
    name = shown(folder)
    state = read_annotator_file("depth_midas", name, folder / "model.safetensors", load_state_dict)
    try:
        config = DPTConfig.from_dict(json.loads((folder / "config.json").read_text("utf-8")))
        model = DPTForDepthEstimation(config)
        model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as error:
        raise UnusableFileError(
            f"preprocessor depth_midas: {name}/model.safetensors does not fit its "
            f"config.json: {error}",
            field="module",
        ) from error
    return _any_size(model.eval())


def midas_input(image: ImageArray, resolution: int) -> tuple[torch.Tensor, Any]:
    """sd-webui-controlnet's input to MiDaS: the padded image at the resolution,
    [1, 3, H, W] in [-1, 1], and the cut back to the unpadded size."""
    padded, cut = pad_to_64(at_resolution(image, resolution))
    pixels = torch.from_numpy(padded.astype(np.float32) / 127.5 - 1.0)
    return pixels.permute(2, 0, 1)[None], cut


def depth_to_map(depth: torch.Tensor) -> np.ndarray:
    """`apply_midas`'s depth image: min..max -> 0..255 (uint8, [H, W])."""
    depth = depth.to(torch.float32)
    depth = depth - torch.min(depth)
    depth = depth / torch.clamp_min(torch.max(depth), 1e-12)  # flat: black, not NaN
    return (depth.cpu().numpy() * 255.0).clip(0, 255).astype(np.uint8)


class Annotators:
    """The preprocessors with weights this installation can run, and their loaded models.

    Args:
        controlnet_roots: the ControlNet folders (`annotators/<folder>/` is looked up in
            each, first found wins; checked at every call, so files added later are found).
        device: where the models run (the engine's device).
        faces: what loads the face embedder (default: insightface).
    Example:
        >>> annotators = Annotators(folders.roots["controlnet"], plan.device)  # doctest: +SKIP
        >>> annotators.find("depth_midas", "module")(image, 512, -1, -1).shape
        (512, 512, 3)
    """

    def __init__(
        self,
        controlnet_roots: Sequence[Path],
        device: torch.device | None = None,
        faces: FaceModels | None = None,
    ) -> None:
        self.roots = tuple(controlnet_roots)
        self.device = device or torch.device("cpu")
        self.faces: FaceModels = faces or InsightFace()
        self._models: dict[tuple[object, ...], Any] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (a listed module is bound to it) without its models or lock."""
        return {"roots": self.roots, "device": self.device, "faces": self.faces}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.roots, self.device, self.faces = state["roots"], state["device"], state["faces"]
        self._models = {}
        self._lock = threading.Lock()

    def face_problem(self) -> str | None:
        """Why IP-Adapter FaceID units cannot run here (None: they can)."""
        return face_problem(self.roots, self.faces)

    def face_embedding(self, image: ImageArray) -> np.ndarray:
        """The normed face embedding [512] of the largest face in an RGB image; raises
        UnusableFileError when the embedder cannot run, `faceid.NoFaceError` without a
        face."""
        problem = self.face_problem()
        folder = face_folder(self.roots)
        if problem is not None or folder is None:
            raise UnusableFileError(f"IP-Adapter FaceID: {problem}", field="controlnet")
        versions = tuple((folder / name).stat().st_mtime_ns for name in FACE_FILES)
        key = ("insightface", str(folder), versions, str(self.device))
        with self._lock:
            if key not in self._models:
                self._models = {k: m for k, m in self._models.items() if k[:2] != key[:2]}
                self._models[key] = self.faces.load(folder, self.device)
            embedder: FaceEmbedder = self._models[key]
        return embedder(image)

    def folder(self, weighted: WeightedPreprocessor) -> Path | None:
        """The first `annotators/<folder>/` holding any of the files it asks for."""
        for folder in annotator_folders(self.roots, weighted.folder):
            if any((folder / name).is_file() for name in (*weighted.files, *weighted.other_files)):
                return folder
        return None

    def problem(self, weighted: WeightedPreprocessor) -> str | None:
        """Why the preprocessor cannot run here (None: it can)."""
        files = ", ".join(weighted.files)
        where = f"models/ControlNet/{ANNOTATORS_SUBFOLDER}/{weighted.folder}/"
        if weighted.unsupported:
            return f"{weighted.unsupported} (its files: {files} in {where})"
        folder = self.folder(weighted)
        if folder is None:
            return f"it needs {files} in {where} ({weighted.source})"
        if weighted.name == "openpose":
            return openpose_problem(folder)
        if all((folder / name).is_file() for name in weighted.files):
            return midas_problem(folder)
        original = [folder / name for name in weighted.other_files if (folder / name).is_file()]
        if original:
            return original_problem(original[0])
        return f"{shown(folder)}: it needs {files} ({weighted.source})"

    def available(self) -> list[Preprocessor]:
        """The preprocessors with weights that can run now, bound to their folders."""
        made = []
        for weighted in WEIGHTED:
            folder = self.folder(weighted)
            if folder is not None and self.problem(weighted) is None:
                made.append(self._bound(weighted, folder))
        return made

    def unavailable(self) -> list[tuple[str, str]]:
        """(name, reason) of each preprocessor with weights that cannot run now."""
        found = [(w.name, self.problem(w)) for w in WEIGHTED]
        return [(name, problem) for name, problem in found if problem is not None]

    def modules(self) -> list[Preprocessor]:
        """Every usable module in sd-webui-controlnet's order."""
        return sorted_preprocessors((*BUILT_IN, *self.available()))

    def find(self, name: str, field: str = "module") -> Preprocessor:
        """A module by name or label; one with weights is bound to its folder, or refused
        with what it needs."""
        for weighted in WEIGHTED:
            if name in (weighted.name, weighted.label):
                problem = self.problem(weighted)
                folder = self.folder(weighted)
                if problem is not None or folder is None:
                    raise InvalidRequestError(
                        f"{field}: preprocessor '{name}' is not available here: {problem}",
                        field=field,
                    )
                return self._bound(weighted, folder)
        return find_preprocessor(name, field)

    def clear(self) -> None:
        """Drop the loaded models (device memory is short)."""
        with self._lock:
            self._models.clear()

    def midas(self, folder: Path) -> Any:
        """The depth model of `folder` on the device, loaded once per file version (the
        transformers folder when complete, else the original file)."""
        complete = (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
        if complete:
            return self._loaded("depth_midas", folder / "model.safetensors", load_midas, folder)
        return self._loaded(
            "depth_midas", folder / ORIGINAL_MIDAS, load_original_midas, folder / ORIGINAL_MIDAS
        )

    def openpose(self, folder: Path) -> BodyPoseModel:
        """The body pose network of `folder` on the device, loaded once per file version
        (`body_pose_model.pth`, else its `.safetensors` twin)."""
        weights = openpose_weights(folder)
        name = shown(folder)
        return self._loaded("openpose", weights, lambda path: load_body_pose(path, name), weights)

    def _loaded(self, module: str, weights: Path, load: Callable[[Path], Any], source: Path) -> Any:
        """`load(source)` on the device, kept per folder until `weights` changes."""
        try:
            version = weights.stat().st_mtime_ns
        except OSError as error:
            raise UnusableFileError(
                f"preprocessor {module}: {shown(weights.parent)}/{weights.name}: {error.strerror}"
            ) from error
        key = (str(weights.parent), weights.name, version, str(self.device))
        with self._lock:
            if key not in self._models:
                self._models = {k: m for k, m in self._models.items() if k[0] != key[0]}
                self._models[key] = load(source).to(self.device)
            return self._models[key]

    def _bound(self, weighted: WeightedPreprocessor, folder: Path) -> Preprocessor:
        run = self._run_openpose if weighted.name == "openpose" else self._run_midas
        return Preprocessor(
            weighted.name,
            weighted.label,
            partial(run, folder),
            priority=weighted.priority,
            tags=weighted.tags,
        )

    def _run_midas(
        self, folder: Path, image: ImageArray, resolution: int, a: float, b: float
    ) -> ImageArray:
        """sd-webui-controlnet's `midas` (see the module docstring): uint8 [H, W, 1]."""
        model = self.midas(folder)
        pixels, cut = midas_input(image, resolution)
        with torch.inference_mode():
            depth = dpt_depth(model, pixels.to(self.device))[0]
        return cut(depth_to_map(depth)[:, :, None])

    def _run_openpose(
        self, folder: Path, image: ImageArray, resolution: int, a: float, b: float
    ) -> ImageArray:
        """sd-webui-controlnet's `openpose` (body only; `pipelines.controlnet.openpose`)."""
        return openpose_map(self.openpose(folder), image, resolution, self.device)
