"""Server settings: defaults -> environment (LORASTACK_<FLAG>) -> command-line flags.

One frozen dataclass, read once in `main()`; nothing is read at import time.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipelines.schema import Bounds

OFFLOAD_REFUSAL = (
    "--compile cannot be combined with --lowvram or --medvram: their offload hooks move "
    "weights on and off the device around every call, which a compiled graph cannot follow; "
    "drop one of the flags"
)

PROJECT_DIR = Path(__file__).resolve().parent.parent
ENV_PREFIX = "LORASTACK_"
DEFAULT_MAX_UPLOAD_MB = 8192  # an SDXL checkpoint in fp16 is ~6.9 GB


@dataclass(frozen=True)
class Settings:
    """Everything the operator decides at launch."""

    data_dir: Path = PROJECT_DIR
    ckpt_dirs: tuple[Path, ...] = ()
    lora_dirs: tuple[Path, ...] = ()
    upscaler_dirs: tuple[Path, ...] = ()  # A1111's --esrgan-models-path and kin
    vae_dir: Path | None = None  # A1111's --vae-dir
    embeddings_dir: Path | None = None  # A1111's --embeddings-dir
    controlnet_dir: Path | None = None  # sd-webui-controlnet's --controlnet-dir
    ckpt: str | None = None
    no_download_sd_model: bool = False  # A1111's: no default checkpoint download on first run
    api: bool = False
    nowebui: bool = False
    access_log: bool = False  # one log line per HTTP request (off: page polling is quiet)
    listen: bool = False
    port: int = 7860
    gradio_auth: str | None = None
    api_auth: str | None = None
    admin_auth: str | None = None
    cors_allow_origins: str | None = None
    xformers: bool = False
    medvram: bool = False
    lowvram: bool = False
    no_half_vae: bool = False
    compile: bool = False  # torch.compile the UNet and VAE decoder (pipelines/compiled.py)
    share: bool = False
    threads: int = 0
    max_pixels: int = 0
    device: str = "auto"
    hide_paths: bool = False
    disable_uploads: bool = False
    disable_downloads: bool = False
    allow_checkpoint_uploads: bool = False
    max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB
    civitai_endpoint: str = "https://civitai.com"  # Civitai's API (a mirror, tests)
    rate_limit: int = 0  # requests per minute per user; 0: unlimited
    queue_slots: int = 0  # queued or running jobs per user; 0: unlimited
    ray: str | None = None  # Ray cluster address ("auto", "host:6379", "local"): scale out
    replicas: int = 1
    checkpoints_limit: int = 1  # A1111's sd_checkpoints_limit: checkpoints kept loaded
    checkpoints_keep_in_cpu: bool = True  # A1111's sd_checkpoints_keep_in_cpu
    lora_backup_mb: int = 2048  # idle LoRA base-weight backups kept per model
    lora_cache_mb: int = 2048  # parsed LoRA files kept in memory
    min_replicas: int = 0
    max_replicas: int = 0  # > 0: autoscale between min_replicas and max_replicas
    batch_requests: int = 0  # ms to wait for compatible requests to denoise as one batch; 0: off
    bounds: Bounds = field(default_factory=Bounds)

    def __post_init__(self) -> None:
        """Refuse values no front end could honour, whichever way the settings were built."""
        if self.max_upload_mb < 1:
            raise ValueError("--max-upload-mb must be at least 1")
        if self.rate_limit < 0 or self.queue_slots < 0:
            raise ValueError("--rate-limit and --queue-slots must be 0 (unlimited) or more")
        if self.replicas < 1 or self.min_replicas < 0 or self.max_replicas < 0:
            raise ValueError("--replicas must be at least 1, --min/--max-replicas 0 or more")
        if self.max_replicas and self.min_replicas > self.max_replicas:
            raise ValueError("--min-replicas must not exceed --max-replicas")
        if self.batch_requests < 0:
            raise ValueError("--batch-requests must be 0 (off) or a number of milliseconds")
        if self.compile and (self.lowvram or self.medvram):
            raise ValueError(OFFLOAD_REFUSAL)
        if self.checkpoints_limit < 1:
            raise ValueError("--checkpoints-limit must be at least 1")
        if self.admin_auth is not None:
            user, colon, password = self.admin_auth.partition(":")
            if not (user and colon and password):
                raise ValueError("--admin-auth must look like user:pass (both non-empty)")
        if self.lora_backup_mb < 0 or self.lora_cache_mb < 0:
            raise ValueError("--lora-backup-mb and --lora-cache-mb must be 0 or more")
        if self.bounds.max_steps < 1:
            raise ValueError("--max-steps must be at least 1")
        if self.bounds.max_size < self.bounds.min_size:
            raise ValueError(f"--max-size must be at least {self.bounds.min_size}")

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024

    @property
    def models_dirs(self) -> tuple[Path, ...]:
        return self.ckpt_dirs or (self.data_dir / "models",)

    @property
    def loras_dirs(self) -> tuple[Path, ...]:
        return self.lora_dirs or (self.data_dir / "loras",)

    @property
    def vae_dirs(self) -> tuple[Path, ...]:
        """`--vae-dir`; `models/VAE/` inside every checkpoint folder is scanned anyway."""
        return (self.vae_dir,) if self.vae_dir else ()

    @property
    def controlnet_dirs(self) -> tuple[Path, ...]:
        """`--controlnet-dir`; `models/ControlNet/` inside every checkpoint folder is
        scanned anyway (sd-webui-controlnet's places)."""
        return (self.controlnet_dir,) if self.controlnet_dir else ()

    @property
    def embeddings_dirs(self) -> tuple[Path, ...]:
        """`--embeddings-dir`, else `<data-dir>/embeddings` (A1111's place)."""
        return (self.embeddings_dir or self.data_dir / "embeddings",)

    @property
    def outputs_dir(self) -> Path:
        return self.data_dir / "outputs"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    @property
    def torch_threads(self) -> int:
        return self.threads if self.threads > 0 else (os.cpu_count() or 1)

    @property
    def host(self) -> str:
        return "0.0.0.0" if self.listen else "127.0.0.1"


UPSCALER_FLAGS = ("esrgan", "realesrgan", "swinir", "dat")
"""A1111's `--<kind>-models-path` flags; every folder given holds upscalers of any kind."""


def build_parser() -> argparse.ArgumentParser:
    """The contract's flags (A1111 names where they exist)."""
    parser = argparse.ArgumentParser(prog="lorastack", description="LoRA-first SD web UI")
    add = parser.add_argument
    add("--data-dir", type=Path, help="outputs, settings and caches; parent of models/ loras/")
    add("--ckpt-dir", action="append", type=Path, help="checkpoint folder (repeatable)")
    add("--lora-dir", action="append", type=Path, help="LoRA folder (repeatable)")
    add("--vae-dir", type=Path, help="VAE folder (models/VAE/ is scanned as well)")
    add("--embeddings-dir", type=Path, help="textual-inversion embeddings (default: embeddings/)")
    add(
        "--controlnet-dir",
        type=Path,
        help="ControlNet model folder (models/ControlNet/ is scanned as well)",
    )
    for kind in UPSCALER_FLAGS:
        add(f"--{kind}-models-path", type=Path, help=f"{kind} upscaler folder (A1111's flag)")
    add("--ckpt", help="start-up checkpoint: listed name, path, or Hub repo id org/repo")
    add(
        "--no-download-sd-model",
        action="store_true",
        help="with no checkpoint found, run the demo model instead of downloading one",
    )
    add("--api", action="store_true", help="serve the A1111-compatible API under /sdapi/v1")
    add("--nowebui", action="store_true", help="serve the API only")
    add("--access-log", action="store_true", help="log every HTTP request (off by default)")
    add("--listen", action="store_true", help="bind 0.0.0.0 instead of 127.0.0.1")
    add("--port", type=int, help="port (default 7860)")
    add("--gradio-auth", help="user:pass[,user2:pass2] for the web UI")
    add("--api-auth", help="user:pass[,user2:pass2] (HTTP basic) for every API route")
    add("--admin-auth", help="user:pass that admin actions (saving defaults) ask for")
    add("--cors-allow-origins", help="comma-separated origins allowed by CORS")
    add("--xformers", action="store_true", help="use xformers attention when available")
    add("--medvram", action="store_true", help="offload whole models to CPU between uses")
    add("--lowvram", action="store_true", help="offload layer by layer (slowest, least VRAM)")
    add("--no-half-vae", action="store_true", help="keep the VAE in fp32 on GPU")
    add(
        "--compile",
        action="store_true",
        help="torch.compile the UNet and VAE decoder (each new size compiles; LoRA changes do not)",
    )
    add("--share", action="store_true", help="create a public Gradio share link")
    add("--threads", type=int, help="torch CPU threads (default: all cores)")
    add("--max-pixels", type=int, help="limit of width*height*batch (default 4 MP GPU, 1 MP CPU)")
    add("--device", help="auto, cpu, cuda, cuda:N or mps")
    add("--hide-paths", action="store_true", help="hide host file paths from clients")
    add("--disable-uploads", action="store_true", help="no file uploads from the UI")
    add("--disable-downloads", action="store_true", help="no downloads by URL or Hub reference")
    add(
        "--allow-checkpoint-uploads",
        action="store_true",
        help="let users upload or download checkpoints, not only LoRAs",
    )
    add("--civitai-endpoint", help="Civitai API base URL (default https://civitai.com)")
    add(
        "--max-upload-mb",
        type=int,
        help=f"largest upload/download (default {DEFAULT_MAX_UPLOAD_MB})",
    )
    add("--max-steps", type=int, help="most sampling steps a request may ask for (default 150)")
    add("--max-size", type=int, help="largest width or height a request may ask for (2048)")
    add("--rate-limit", type=int, help="generation requests per minute per user (0: no limit)")
    add("--queue-slots", type=int, help="queued or running jobs per user (0: no limit)")
    add("--checkpoints-limit", type=int, help="checkpoints kept loaded at once (default 1)")
    add("--lora-backup-mb", type=int, help="MB of idle LoRA weight backups per model (2048)")
    add("--lora-cache-mb", type=int, help="MB of parsed LoRA files kept in memory (2048)")
    add(
        "--batch-requests",
        type=int,
        metavar="MS",
        help="wait up to MS ms for compatible requests and denoise them as one batch (0: off)",
    )
    add("--ray", help="Ray cluster address (auto, host:6379, local): generate on replicas")
    add("--replicas", type=int, help="engine replicas with --ray (default 1)")
    add("--min-replicas", type=int, help="autoscaling lower bound with --ray")
    add("--max-replicas", type=int, help="autoscaling upper bound with --ray (0: fixed count)")
    return parser


def _env_value(env: Mapping[str, str], dest: str) -> str | None:
    return env.get(ENV_PREFIX + dest.upper())


def parse_settings(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Settings from flags, falling back to LORASTACK_* environment variables, then defaults.

    Args:
        argv: command-line arguments (without the program name).
        env: the environment (os.environ by default).
    Example:
        >>> parse_settings(["--port", "8000"], {}).port
        8000
    """
    env = os.environ if env is None else env
    parser = build_parser()
    args = parser.parse_args(list(argv or []))
    values: dict[str, object] = {}
    for action in parser._actions:
        dest = action.dest
        if dest == "help":
            continue
        flag_value = getattr(args, dest)
        given = flag_value is not None and flag_value is not False
        raw = None if given else _env_value(env, dest)
        if given:
            values[dest] = flag_value
        elif raw is not None:
            if isinstance(action, argparse._StoreTrueAction):
                values[dest] = raw.strip().lower() in ("1", "true", "yes", "on")
            elif action.dest in ("ckpt_dir", "lora_dir"):
                values[dest] = [Path(p) for p in raw.split(os.pathsep) if p]
            elif action.type is int:
                try:
                    values[dest] = int(raw)
                except ValueError:
                    parser.error(f"{ENV_PREFIX}{dest.upper()} must be an integer, got {raw!r}")
            elif action.type is Path:
                values[dest] = Path(raw)
            else:
                values[dest] = raw
    if "SPACE_ID" in env:
        values.setdefault("listen", True)
        values.setdefault("port", 7860)
    data_dir = Path(values.pop("data_dir", PROJECT_DIR)).expanduser().resolve()
    ckpt_dirs = tuple(Path(p).expanduser().resolve() for p in values.pop("ckpt_dir", None) or ())
    lora_dirs = tuple(Path(p).expanduser().resolve() for p in values.pop("lora_dir", None) or ())
    upscaler_dirs = tuple(
        Path(path).expanduser().resolve()
        for kind in UPSCALER_FLAGS
        if (path := values.pop(f"{kind}_models_path", None))
    )
    for folder_flag in ("vae_dir", "embeddings_dir", "controlnet_dir"):
        if values.get(folder_flag) is not None:
            values[folder_flag] = Path(values[folder_flag]).expanduser().resolve()  # type: ignore[arg-type]
    max_pixels = int(values.get("max_pixels") or 0)
    limits = {k: values.pop(k) for k in ("max_steps", "max_size") if k in values}
    try:
        settings = Settings(
            data_dir=data_dir,
            ckpt_dirs=ckpt_dirs,
            lora_dirs=lora_dirs,
            upscaler_dirs=upscaler_dirs,
            bounds=replace(Bounds(), **limits),  # type: ignore[arg-type]
            **{k: v for k, v in values.items() if v is not None},  # type: ignore[arg-type]
        )
    except ValueError as error:
        parser.error(str(error))
    if max_pixels < 0 or settings.threads < 0 or not 0 < settings.port < 65536:
        parser.error("--max-pixels, --threads and --port must be positive")
    return settings


def apply_threads(settings: Settings) -> None:
    """Set torch's CPU threads from `--threads` (only entry points call this: a library
    must not change process-wide state)."""
    import torch

    torch.set_num_threads(settings.torch_threads)


def parse_credentials(text: str | None) -> list[tuple[str, str]]:
    """`user:pass[,user2:pass2]` (A1111's --api-auth / --gradio-auth) -> pairs."""
    pairs = []
    for item in (text or "").split(","):
        user, colon, password = item.strip().partition(":")
        if not colon or not user:
            raise ValueError(f"credentials must look like user:pass[,user2:pass2]; got {item!r}")
        pairs.append((user, password))
    return pairs


def admin_credentials(settings: Settings) -> tuple[str, str] | None:
    """The one `--admin-auth USER:PASS` pair, or None when no admin is configured."""
    if not settings.admin_auth:
        return None
    user, _, password = settings.admin_auth.partition(":")
    return user, password
