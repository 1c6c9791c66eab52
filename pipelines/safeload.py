"""The one safe way the project reads weight files.

Model files come from strangers on the internet. A `.safetensors` file is plain data, but
its header is still checked by hand before anything trusts it, so a corrupt or hostile
file gives a sentence naming the file and the fault instead of a crash or a huge
allocation. Pickle checkpoints (`.ckpt`, `.pt`, `.pth`, `.bin`) go only through torch's
`weights_only` unpickler, widened by exactly the globals AUTOMATIC1111's safe unpickler
allows; anything else they ask for is refused and nothing in them runs.

torch, numpy and safetensors are imported inside the loaders, so the registry can classify
files with `read_safetensors_header` without importing torch.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import pickle
import re
import struct
import threading
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.errors import UnsafeCheckpointError, UnusableFileError

if TYPE_CHECKING:
    import torch

SAFETENSORS_EXTENSIONS: frozenset[str] = frozenset({".safetensors"})
PICKLE_EXTENSIONS: frozenset[str] = frozenset({".ckpt", ".pt", ".pth", ".bin"})
WEIGHT_EXTENSIONS: frozenset[str] = SAFETENSORS_EXTENSIONS | PICKLE_EXTENSIONS

MAX_HEADER_BYTES = 100_000_000
"""The safetensors library's own limit; a larger length field is a "header bomb"."""

# Bits per element of every dtype the safetensors format defines (sub-byte floats included).
_DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
}

_LIGHTNING_MODULE = "pytorch_lightning.callbacks.model_checkpoint"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor entry of a safetensors header; `offsets` are relative to the data area."""

    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int]

    @property
    def nbytes(self) -> int:
        """Bytes the tensor occupies in the file."""
        return self.offsets[1] - self.offsets[0]


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated safetensors header: what the file holds, without its tensor data.

    `header_size` is the JSON length from the 8-byte prefix; tensor data starts at
    `data_offset` (= 8 + header_size) and `TensorInfo.offsets` count from there.
    """

    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    header_size: int
    data_offset: int

    @property
    def data_size(self) -> int:
        """Bytes of tensor data the header describes (the file holds exactly this many)."""
        return max((info.offsets[1] for info in self.tensors.values()), default=0)


def printable_name(text: str) -> str:
    """`text`, with the bytes of a non-UTF-8 file name (surrogate escapes) shown as `\\xNN`,
    so it can go into JSON, HTTP and the terminal."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def non_utf8_name_error(name: str) -> str | None:
    """The reason a file whose name is not valid UTF-8 is unusable (None when it is)."""
    if printable_name(name) == name:
        return None
    return f"{printable_name(name)}: the file name is not valid UTF-8; rename the file"


def is_file_quietly(path: Path) -> bool:
    """`path.is_file()`, but a name the file system refuses (too long) is simply absent."""
    try:
        return path.is_file()
    except OSError:
        return False


def _unusable(path: Path, what: str) -> UnusableFileError:
    """An UnusableFileError whose message starts with the file name (never the host path)."""
    return UnusableFileError(f"{path.name}: {what}")


def _cause(err: BaseException) -> str:
    """A one-line description of a library exception, for user-facing messages."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _extension(path: Path) -> str:
    """The lower-cased extension, refused unless it is a weight format we read."""
    ext = path.suffix.lower()
    if ext not in WEIGHT_EXTENSIONS:
        allowed = ", ".join(sorted(WEIGHT_EXTENSIONS))
        shown = f"extension {path.suffix!r}" if path.suffix else "no extension"
        raise _unusable(path, f"{shown}: not a weights format we read (allowed: {allowed})")
    return ext


# --------------------------------------------------------------------------- safetensors


def _parse_header_json(path: Path, raw: bytes) -> dict[str, Any]:
    """Decode the header bytes into a JSON object, refusing duplicate keys, NaN and lone
    surrogates (which the Rust safetensors reader refuses too)."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                raise ValueError(f"duplicate key {key!r}")
            for text in (key, value) if isinstance(value, str) else (key,):
                if printable_name(text) != text:  # JSON escapes of lone surrogates
                    raise ValueError(f"lone surrogate in {printable_name(text)!r}")
            obj[key] = value
        return obj

    def no_constants(name: str) -> Any:
        raise ValueError(f"non-standard constant {name}")

    try:
        parsed = json.loads(
            raw.decode("utf-8"), object_pairs_hook=no_duplicates, parse_constant=no_constants
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise _unusable(path, f"header is not valid JSON ({_cause(err)})") from None
    if not isinstance(parsed, dict):
        raise _unusable(path, f"header is JSON but not an object (found {type(parsed).__name__})")
    return parsed


def _is_int(value: object) -> bool:
    """True for a JSON integer (bool is an int subclass in Python, but not in JSON)."""
    return type(value) is int


def _tensor_info(path: Path, name: str, entry: object) -> TensorInfo:
    """Validate one tensor entry: known dtype, shape of naturals, offsets matching its size."""
    if not isinstance(entry, dict):
        raise _unusable(path, f"tensor {name!r}: entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPE_BITS:
        raise _unusable(path, f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _unusable(path, f"tensor {name!r}: shape {shape!r} is not a list of sizes")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _unusable(path, f"tensor {name!r}: data_offsets {offsets!r} are not [begin, end]")
    numel = 1
    for dim in shape:
        numel *= dim
    bits = numel * _DTYPE_BITS[dtype]
    if bits % 8:
        raise _unusable(path, f"tensor {name!r}: {dtype} x {shape} is not a whole number of bytes")
    if offsets[1] - offsets[0] != bits // 8:
        raise _unusable(
            path,
            f"tensor {name!r}: {dtype} x {shape} needs {bits // 8} bytes, "
            f"data_offsets {offsets} give {offsets[1] - offsets[0]}",
        )
    return TensorInfo(dtype=dtype, shape=tuple(shape), offsets=(offsets[0], offsets[1]))


def _check_layout(path: Path, tensors: dict[str, TensorInfo], data_bytes: int) -> None:
    """Tensors must tile the data area exactly (as the safetensors library requires)."""
    end = 0
    for name, info in sorted(tensors.items(), key=lambda item: item[1].offsets):
        begin = info.offsets[0]
        if begin < end:
            raise _unusable(
                path,
                f"tensor {name!r}: data_offsets {list(info.offsets)} overlap the previous "
                f"tensor, which ends at {end}",
            )
        if begin > end:
            raise _unusable(
                path,
                f"tensor {name!r}: data_offsets {list(info.offsets)} leave a gap of "
                f"{begin - end} bytes after offset {end}",
            )
        end = info.offsets[1]
    if data_bytes < end:
        raise _unusable(
            path, f"truncated: header says {end} bytes of tensor data, file has {data_bytes}"
        )
    if data_bytes > end:
        raise _unusable(
            path,
            f"{data_bytes - end} unexpected bytes after the tensor data "
            f"(header says {end} bytes of tensor data, file has {data_bytes})",
        )


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Read and validate a safetensors header without loading any tensor data.

    The registry uses this to classify files cheaply; `load_state_dict` uses it so that
    the safetensors library only ever sees a file whose layout is already known sound.

    Args:
        path: the `.safetensors` file (the extension itself is not checked here).

    Returns:
        The metadata (`__metadata__`, strings only), one `TensorInfo` per tensor, and
        where the data area starts.

    Raises:
        UnusableFileError: the message names the file and the fault, e.g.
            "x.safetensors: truncated: header says 12345 bytes of tensor data, file has 100".

    Example:
        >>> header = read_safetensors_header(Path("loras/ink.safetensors"))  # doctest: +SKIP
        >>> header.metadata.get("ss_output_name")  # doctest: +SKIP
    """
    # 1. The 8-byte little-endian header length, checked against the file and the cap.
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise _unusable(path, "empty file (0 bytes)")
            if size < 8:
                raise _unusable(
                    path, f"too short for a safetensors file: {size} bytes, needs at least 8"
                )
            prefix = f.read(8)
            if len(prefix) < 8:  # replaced or cut while being read (a hash beside an upload)
                raise _unusable(path, "changed while being read: fewer than 8 bytes left")
            (header_size,) = struct.unpack("<Q", prefix)
            if header_size > MAX_HEADER_BYTES:
                raise _unusable(
                    path,
                    f"header length field says {header_size} bytes, over the "
                    f"{MAX_HEADER_BYTES}-byte limit (a corrupt or hostile 'header bomb')",
                )
            if header_size > size - 8:
                raise _unusable(
                    path,
                    f"header length field says {header_size} bytes, but only {size - 8} "
                    "bytes follow it (truncated, or not a safetensors file)",
                )
            # 2. The JSON header itself (the file may shrink under us: check the read).
            raw = f.read(header_size)
    except OSError as err:
        raise _unusable(path, f"cannot be read ({err.strerror or _cause(err)})") from None
    if len(raw) != header_size:
        raise _unusable(path, f"truncated while reading: header is {header_size} bytes")
    parsed = _parse_header_json(path, raw)

    # 3. Metadata: an optional object of strings.
    metadata = parsed.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _unusable(path, "__metadata__ is not an object of strings")

    # 4. Tensors: each entry sound on its own, then all of them tiling the data area.
    tensors = {name: _tensor_info(path, name, entry) for name, entry in parsed.items()}
    _check_layout(path, tensors, size - 8 - header_size)
    return SafetensorsHeader(
        metadata=dict(metadata),
        tensors=tensors,
        header_size=header_size,
        data_offset=8 + header_size,
    )


# --------------------------------------------------------------------------- pickle


class _LightningCheckpointStandIn:
    """Takes the place of Lightning's ModelCheckpoint callback: keeps its state, runs nothing.

    Old checkpoints (sd-v1-4.ckpt) pickle the class in their `callbacks` entry; A1111 allows
    it, and we do too without importing pytorch_lightning.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        """Accept and ignore whatever the pickle passes."""


@functools.cache
def _extra_safe_globals() -> tuple[Any, ...]:
    """A1111's safe-unpickler globals that torch's weights_only unpickler lacks.

    The rest of A1111's list is allowed by torch already: `collections.OrderedDict`,
    `_codecs.encode`, `__builtin__.set`, the legacy storage classes, `torch.float32` and
    the `torch._utils._rebuild_*` helpers. Entries are objects, or (object, pickled path)
    pairs where the path in old files differs from the object's own module.
    """
    import numpy as np
    import torch

    # numpy 2 moved numpy.core to numpy._core; files from either era name their own path.
    core = "numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core"
    multiarray = importlib.import_module(f"{core}.multiarray")
    # numpy dtypes unpickle as instances of per-type classes (np.dtypes.Float64DType);
    # only numeric ones are allowed: object/void/string dtypes are never weights.
    dtype_classes = [
        cls
        for name in dir(np.dtypes)
        if isinstance(cls := getattr(np.dtypes, name), type)
        and issubclass(cls, np.dtype)
        and issubclass(getattr(cls, "type", object), (np.number, np.bool_))
    ]
    lightning_module = types.ModuleType(_LIGHTNING_MODULE)
    lightning_module.ModelCheckpoint = _LightningCheckpointStandIn  # type: ignore[attr-defined]
    return (
        (multiarray.scalar, "numpy.core.multiarray.scalar"),
        (multiarray.scalar, "numpy._core.multiarray.scalar"),
        (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
        (multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
        (np.ndarray, "numpy.ndarray"),
        (np.dtype, "numpy.dtype"),
        *dtype_classes,
        (torch.nn.ParameterDict, "torch.nn.modules.container.ParameterDict"),
        (_LightningCheckpointStandIn, f"{_LIGHTNING_MODULE}.ModelCheckpoint"),
        (lightning_module, "pytorch_lightning.callbacks.model_checkpoint"),
    )


# torch keeps the allowlist in one process-wide set: this lock stops two loads from
# removing each other's entries halfway through.
_PICKLE_LOCK = threading.Lock()

_UNSAFE_GLOBAL_RES = (
    re.compile(r"GLOBAL (\S+) was not an allowed global"),
    re.compile(r"unsupported GLOBAL (\S+) whose module \S+ is blocked"),
)
_UNSAFE_OBJECT_RE = re.compile(
    r"(Trying to call reduce for unrecognized function.*"
    r"|Can only build .*|Can only create new object .*)"
)


def _check_zip(path: Path) -> None:
    """Refuse damaged archives and TorchScript programs before torch opens them."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise _unusable(path, f"damaged or truncated zip archive ({_cause(err)})") from None
    if any(name.endswith("/constants.pkl") for name in names):  # as torch.jit archives have
        raise _unusable(path, "a TorchScript program, not a checkpoint of weights")
    if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
        raise _unusable(path, "zip archive without data.pkl: not a torch checkpoint")


def _cut_inside_global(shown: str, tail: bytes) -> bool:
    """True when the global torch names is a GLOBAL line cut off by the end of the file.

    torch drops the last byte of each GLOBAL line, taking it for the newline; in a truncated
    legacy file that byte is data, so it reports a nonsense name such as "torch.Fl".
    """
    name = shown.rpartition(".")[2]
    if not name:
        return True
    return bool(tail) and not tail.endswith(b"\n") and tail[:-1].endswith(name.encode())


def _refusal(
    path: Path, err: pickle.UnpicklingError, unsafe_globals: list[str], tail: bytes | None
) -> Exception:
    """Turn torch's weights_only failure into UnsafeCheckpointError or UnusableFileError.

    `unsafe_globals` is the static listing of a zip checkpoint; `tail` the last bytes of a
    legacy (non-zip) one, whose pickle stream can end mid-instruction when truncated.
    """
    # torch re-raises with advice to drop weights_only; its own reason is in the context.
    reason = str(err.__context__ if isinstance(err.__context__, Exception) else err)
    advice = (
        "Nothing in it was run. Convert it to .safetensors with a tool you trust, "
        "or get a .safetensors release of it."
    )
    for pattern in _UNSAFE_GLOBAL_RES:
        if match := pattern.search(reason):
            name = match.group(1)
            if tail is not None and _cut_inside_global(name, tail):
                return _unusable(path, "truncated: the pickle stream ends inside an instruction")
            # torch prints builtins without their module ("eval" for builtins.eval).
            name = name if "." in name else f"builtins.{name}"
            others = sorted(set(unsafe_globals) - {name})
            also = f" (also: {', '.join(others)})" if others else ""
            return UnsafeCheckpointError(
                f"{path.name}: refused: its pickle needs {name}{also}, which is not on the "
                f"safe list and could run code. {advice}"
            )
    if match := _UNSAFE_OBJECT_RE.search(reason):
        return UnsafeCheckpointError(
            f"{path.name}: refused: its pickle builds objects the safe loader does not allow "
            f"({match.group(1).strip()}). {advice}"
        )
    return _unusable(path, f"not a valid torch checkpoint ({_cause(err.__context__ or err)})")


def load_pickle(path: Path, *, mmap: bool = True) -> object:
    """Unpickle a torch checkpoint with no code execution: torch's weights_only unpickler.

    Exposed for callers that need the whole object (textual-inversion embeddings keep a
    `ParameterDict`); weights go through `load_state_dict`. Tensors land on the CPU and,
    for zip checkpoints with `mmap`, stay backed by the file until touched.

    Raises:
        UnsafeCheckpointError: the pickle needs a global outside the safe list; the
            message names it. Nothing in the file was run.
        UnusableFileError: any other failure (empty, truncated, not a checkpoint).
    """
    import torch

    # 1. Cheap checks with clear messages before torch sees the file.
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            magic = f.read(4)
    except OSError as err:
        raise _unusable(path, f"cannot be read ({err.strerror or _cause(err)})") from None
    if size == 0:
        raise _unusable(path, "empty file (0 bytes)")
    is_zip = magic == b"PK\x03\x04"
    if is_zip:
        _check_zip(path)

    # 2. The weights_only load, widened by A1111's extra globals for this call only.
    with _PICKLE_LOCK:
        present = set(torch.serialization.get_safe_globals())
        extra = [g for g in _extra_safe_globals() if g not in present]
        with torch.serialization.safe_globals(extra):
            try:
                # mmap needs the zip format; the legacy (pre-1.6) stream is read whole.
                return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip and mmap)
            except pickle.UnpicklingError as err:
                unsafe_globals: list[str] = []
                tail: bytes | None = None
                try:
                    if is_zip:
                        unsafe_globals = torch.serialization.get_unsafe_globals_in_checkpoint(path)
                    else:
                        with open(path, "rb") as f:
                            f.seek(max(0, size - 256))
                            tail = f.read()
                except Exception:  # only refines the message; the refusal stands
                    pass
                raise _refusal(path, err, unsafe_globals, tail) from err
            except EOFError as err:
                raise _unusable(path, "truncated: the file ends before its pickle does") from err
            except Exception as err:  # torch raises RuntimeError, ValueError, ... on damage
                raise _unusable(path, f"not a valid torch checkpoint ({_cause(err)})") from err


def _tensors_only(path: Path, obj: object) -> dict[str, torch.Tensor]:
    """Unwrap a top-level `state_dict` (old checkpoints nest it) and keep only tensors."""
    import torch

    if not isinstance(obj, dict):
        raise _unusable(path, f"holds a {type(obj).__name__}, not a dict of weights")
    inner = obj.get("state_dict")
    if isinstance(inner, dict):
        obj = inner
    return {
        key: value.detach() if value.requires_grad else value
        for key, value in obj.items()
        if isinstance(key, str) and isinstance(value, torch.Tensor)
    }


def load_state_dict(
    path: Path, *, device: str = "cpu", mmap: bool = True
) -> dict[str, torch.Tensor]:
    """Load a weights file as a flat name -> tensor dict, the only way the project does.

    Args:
        path: a `.safetensors`, `.ckpt`, `.pt`, `.pth` or `.bin` file (any case).
        device: where the tensors end up; files are read on the CPU first.
        mmap: map zip checkpoints instead of reading them into memory (pickles only;
            safetensors are always mapped by their library).

    Returns:
        Tensors by key; a top-level `state_dict` is unwrapped and non-tensor values
        (`global_step`, `epoch`, callbacks) are dropped.

    Raises:
        UnsafeCheckpointError: a pickle that needs code to unpickle; nothing was run.
        UnusableFileError: unknown extension, or a file that is empty, truncated or
            corrupt; the message names the file and the cause.

    Example:
        >>> sd = load_state_dict(Path("models/v1-5-pruned-emaonly.safetensors"))  # doctest: +SKIP
        >>> sd["model.diffusion_model.out.2.bias"].shape  # doctest: +SKIP
        torch.Size([4])
    """
    import torch

    target = torch.device(device)  # a bad device string is the caller's bug: raise it raw
    if _extension(path) in SAFETENSORS_EXTENSIONS:
        read_safetensors_header(path)
        from safetensors.torch import load_file

        try:
            state = load_file(os.fspath(path), device="cpu")
        except Exception as err:  # SafetensorError, or OSError if the file changed since
            raise _unusable(path, f"cannot be loaded ({_cause(err)})") from err
    else:
        state = _tensors_only(path, load_pickle(path, mmap=mmap))
    if target.type == "cpu":
        return state
    return {key: state.pop(key).to(target) for key in list(state)}
