"""Shared fixtures: tiny, seeded, offline models built once per session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

# Nothing in the tests may reach the network (the Hub is unreachable here anyway).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Images are compared bit for bit, and the reference outputs were made with 2 threads;
# entry points (app.main, the CLI) set threads from --threads, tests set them here.
torch.set_num_threads(2)

from pipelines.loading import CONFIGS_DIR, LoadedModel, random_pipeline  # noqa: E402
from tests.ldm_export import save_single_file  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
DEMO_YAML = CONFIGS_DIR / "demo-tiny.yaml"
SDXL_YAML = FIXTURES / "tiny-sdxl.yaml"


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_sd1(cache_root: Path) -> LoadedModel:
    """Tiny SD1-shaped pipeline with seeded random weights (the demo model)."""
    return random_pipeline(DEMO_YAML, 0, cache_root)


@pytest.fixture(scope="session")
def tiny_sdxl(cache_root: Path) -> LoadedModel:
    """Tiny SDXL-shaped pipeline: two text encoders of different widths."""
    return random_pipeline(SDXL_YAML, 0, cache_root)


def copy_yaml_with_clip(yaml_path: Path, target: Path) -> None:
    """Write `yaml_path` as the sidecar `target`, with the text-encoder folders it names
    copied beside it so relative `version:` paths keep resolving."""
    text = yaml_path.read_text()
    for folder in ("demo-tiny-clip", "tiny-clip-g"):
        for source in (CONFIGS_DIR / folder, FIXTURES / folder):
            if source.is_dir() and folder in text:
                shutil.copytree(source, target.parent / folder, dirs_exist_ok=True)
    text = text.replace("../../pipelines/configs/demo-tiny-clip", "demo-tiny-clip")
    target.write_text(text)


@pytest.fixture(scope="session")
def models_dir(
    tmp_path_factory: pytest.TempPathFactory, tiny_sd1: LoadedModel, tiny_sdxl: LoadedModel
) -> Path:
    """A models folder holding the tiny SD1 and SDXL as single files with sidecar yamls,
    and the tiny SD1 as a diffusers folder."""
    folder = tmp_path_factory.mktemp("models")
    save_single_file(tiny_sd1.pipe, folder / "tiny-sd1.safetensors", text_encoder_layout="hf")
    copy_yaml_with_clip(DEMO_YAML, folder / "tiny-sd1.yaml")
    (folder / "xl").mkdir()
    save_single_file(tiny_sdxl.pipe, folder / "xl" / "tiny-sdxl.safetensors")
    copy_yaml_with_clip(SDXL_YAML, folder / "xl" / "tiny-sdxl.yaml")
    tiny_sd1.pipe.save_pretrained(folder / "tiny-sd1-diffusers")
    return folder
