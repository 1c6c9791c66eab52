"""Face embeddings for IP-Adapter FaceID units, made as sd-webui-controlnet's
`ip-adapter_face_id` module makes them (`InsightFaceModel.run_model`): insightface's
buffalo_l pack, run through onnxruntime, finds the faces in the unit's image (given as BGR,
detection size 640), and the normed 512-wide ArcFace embedding of the largest face is what
the adapter projects.

insightface is optional. It is not in the requirements: it pulls onnxruntime, onnx,
scikit-image and opencv-python, and opencv-python installs the same `cv2` module as the
opencv-python-headless the project uses, so the two would overwrite each other. FaceID
adapters are usable only when `insightface` and `onnxruntime` import and the pack's
detector and recognition files are in `models/ControlNet/annotators/insightface/models/
buffalo_l/` (sd-webui-controlnet keeps them in `annotator/downloads/insightface/models/
buffalo_l/`); otherwise they are listed unusable naming both. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from pipelines.errors import UnusableFileError
from pipelines.folders.controlnets import ANNOTATORS_SUBFOLDER

log = logging.getLogger(__name__)

FACE_PACKAGES = ("insightface", "onnxruntime")
FACE_FOLDER = ("insightface", "models", "buffalo_l")
"""Under `annotators/`: insightface's `<root>/models/<pack>` layout, as sd-webui-controlnet
keeps it."""
FACE_FILES = ("det_10g.onnx", "w600k_r50.onnx")
"""buffalo_l's SCRFD face detector and ArcFace recognition model (the pack's other files,
landmarks and gender/age, are not needed)."""
DETECTION_SIZE = (640, 640)

FaceEmbedder = Callable[[np.ndarray], np.ndarray]
"""An RGB uint8 image [H, W, 3] -> the normed face embedding [512] of its largest face;
raises NoFaceError when it finds none."""


class NoFaceError(ValueError):
    """The face detector found no face in the image."""


class FaceModels(Protocol):
    """What loads the face embedder (insightface here; a stand-in in tests)."""

    def missing(self) -> str | None:
        """Why no embedder can load in this installation (None: it can, given the files)."""

    def load(self, folder: Path, device: torch.device) -> FaceEmbedder:
        """The embedder of the pack in `folder`, on `device`."""


class InsightFace:
    """insightface's `FaceAnalysis` with the buffalo_l pack (detection and recognition)."""

    def missing(self) -> str | None:
        absent = [name for name in FACE_PACKAGES if importlib.util.find_spec(name) is None]
        if not absent:
            return None
        return (
            f"the {' and '.join(absent)} package{'s' if len(absent) > 1 else ''} (not "
            "installed; `pip install insightface onnxruntime`)"
        )

    def load(self, folder: Path, device: torch.device) -> FaceEmbedder:
        from insightface.app import FaceAnalysis

        cuda = device.type == "cuda"
        providers = ["CUDAExecutionProvider"] if cuda else []
        try:
            app = FaceAnalysis(
                name=folder.name,
                root=str(folder.parent.parent),  # <root>/models/<pack> exists: no download
                providers=[*providers, "CPUExecutionProvider"],
                allowed_modules=["detection", "recognition"],
            )
            app.prepare(ctx_id=(device.index or 0) if cuda else -1, det_size=DETECTION_SIZE)
        except Exception as error:  # onnxruntime's load errors derive from Exception only
            log.warning("insightface could not load %s: %s", folder, error)
            where = "/".join((ANNOTATORS_SUBFOLDER, *FACE_FOLDER))  # no host path to clients
            raise UnusableFileError(
                f"IP-Adapter FaceID: insightface could not load the files in {where} "
                f"({type(error).__name__}; the server log has the details)",
                field="controlnet",
            ) from error
        return partial(largest_face_embedding, app)


def largest_face_embedding(app: Any, image: np.ndarray) -> np.ndarray:
    """sd-webui-controlnet's `run_model`: the faces insightface's `app` finds in the image
    (BGR, as insightface reads images), the largest by box area, its normed embedding."""
    faces = app.get(np.ascontiguousarray(image[:, :, ::-1]))
    if not faces:
        raise NoFaceError("insightface found no face in the image")
    largest = max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
    return np.asarray(largest.normed_embedding, dtype=np.float32)


def face_folders(controlnet_roots: Sequence[Path]) -> tuple[Path, ...]:
    """`annotators/insightface/models/buffalo_l/` in every ControlNet folder, in order."""
    return tuple(root.joinpath(ANNOTATORS_SUBFOLDER, *FACE_FOLDER) for root in controlnet_roots)


def face_folder(controlnet_roots: Sequence[Path]) -> Path | None:
    """The first pack folder holding every file needed."""
    for folder in face_folders(controlnet_roots):
        if all((folder / name).is_file() for name in FACE_FILES):
            return folder
    return None


def face_problem(controlnet_roots: Sequence[Path], faces: FaceModels) -> str | None:
    """Why FaceID units cannot run here (None: they can): the packages missing, the files
    missing, or both, named."""
    wanted = []
    missing = faces.missing()
    if missing:
        wanted.append(missing)
    if face_folder(controlnet_roots) is None:
        where = "models/ControlNet/" + "/".join((ANNOTATORS_SUBFOLDER, *FACE_FOLDER)) + "/"
        wanted.append(f"{', '.join(FACE_FILES)} (insightface's buffalo_l pack) in {where}")
    if not wanted:
        return None
    return "it needs insightface face embeddings: " + " and ".join(wanted)
