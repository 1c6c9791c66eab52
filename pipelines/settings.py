"""Server settings: defaults -> environment (LORASTACK_<FLAG>) -> command-line flags.

One frozen dataclass, read once in `main()`; nothing is read at import time.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.schema import Bounds

PROJECT_DIR = Path(__file__).resolve().parent.parent
ENV_PREFIX = "LORASTACK_"


@dataclass(frozen=True)
class Settings:
    """Everything the operator decides at launch."""

    data_dir: Path = PROJECT_DIR
    ckpt_dirs: tuple[Path, ...] = ()
    lora_dirs: tuple[Path, ...] = ()
    ckpt: str | None = None
    api: bool = False
    nowebui: bool = False
    listen: bool = False
    port: int = 7860
    gradio_auth: str | None = None
    api_auth: str | None = None
    cors_allow_origins: str | None = None
    xformers: bool = False
    medvram: bool = False
    lowvram: bool = False
    no_half_vae: bool = False
    share: bool = False
    threads: int = 0
    max_pixels: int = 0
    device: str = "auto"
    hide_paths: bool = False
    bounds: Bounds = field(default_factory=Bounds)

    @property
    def models_dirs(self) -> tuple[Path, ...]:
        return self.ckpt_dirs or (self.data_dir / "models",)

    @property
    def loras_dirs(self) -> tuple[Path, ...]:
        return self.lora_dirs or (self.data_dir / "loras",)

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


def build_parser() -> argparse.ArgumentParser:
    """The contract's flags (A1111 names where they exist)."""
    parser = argparse.ArgumentParser(prog="lorastack", description="LoRA-first SD web UI")
    add = parser.add_argument
    add("--data-dir", type=Path, help="outputs, settings and caches; parent of models/ loras/")
    add("--ckpt-dir", action="append", type=Path, help="checkpoint folder (repeatable)")
    add("--lora-dir", action="append", type=Path, help="LoRA folder (repeatable)")
    add("--ckpt", help="start-up checkpoint: listed name, path, or Hub repo id org/repo")
    add("--api", action="store_true", help="serve the A1111-compatible API under /sdapi/v1")
    add("--nowebui", action="store_true", help="serve the API only")
    add("--listen", action="store_true", help="bind 0.0.0.0 instead of 127.0.0.1")
    add("--port", type=int, help="port (default 7860)")
    add("--gradio-auth", help="user:pass[,user2:pass2] for the web UI")
    add("--api-auth", help="user:pass[,user2:pass2] (HTTP basic) for every API route")
    add("--cors-allow-origins", help="comma-separated origins allowed by CORS")
    add("--xformers", action="store_true", help="use xformers attention when available")
    add("--medvram", action="store_true", help="offload whole models to CPU between uses")
    add("--lowvram", action="store_true", help="offload layer by layer (slowest, least VRAM)")
    add("--no-half-vae", action="store_true", help="keep the VAE in fp32 on GPU")
    add("--share", action="store_true", help="create a public Gradio share link")
    add("--threads", type=int, help="torch CPU threads (default: all cores)")
    add("--max-pixels", type=int, help="limit of width*height*batch (default 4 MP GPU, 1 MP CPU)")
    add("--device", help="auto, cpu, cuda, cuda:N or mps")
    add("--hide-paths", action="store_true", help="hide host file paths from clients")
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
    max_pixels = int(values.get("max_pixels") or 0)
    settings = Settings(
        data_dir=data_dir,
        ckpt_dirs=ckpt_dirs,
        lora_dirs=lora_dirs,
        **{k: v for k, v in values.items() if v is not None},  # type: ignore[arg-type]
    )
    if max_pixels < 0 or settings.threads < 0 or not 0 < settings.port < 65536:
        parser.error("--max-pixels, --threads and --port must be positive")
    return settings
