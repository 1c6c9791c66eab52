"""Every sampler x schedule on the tiny SD1, hashed: run in-process twice and once in a
fresh interpreter (`python -m tests.determinism_matrix MODELS_DIR DATA_DIR`), the three
must agree bit for bit."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import torch

from pipelines.samplers import SAMPLER_NAMES, schedulers_for
from pipelines.schema import GenerationRequest
from pipelines.service import Service, build_service
from pipelines.settings import Settings

COMBINATIONS = [(s, schedule) for s in SAMPLER_NAMES for schedule in schedulers_for(s)]
THREADS = 2


def matrix_hashes(service: Service) -> dict[tuple[str, str], str]:
    """sha256 of each combination's image (64x64, 2 steps, seed 5)."""
    hashes = {}
    for sampler, schedule in COMBINATIONS:
        request = GenerationRequest(
            prompt="a tower",
            sampler_name=sampler,
            scheduler=schedule,
            steps=2,
            width=64,
            height=64,
            seed=5,
            checkpoint="tiny-sd1",
        )
        pixels = np.asarray(service.generate(request).images[0])
        hashes[(sampler, schedule)] = hashlib.sha256(pixels.tobytes()).hexdigest()
    return hashes


def whole(hashes: dict[tuple[str, str], str]) -> str:
    return hashlib.sha256(repr(sorted(hashes.items())).encode()).hexdigest()


def main(models_dir: str, data_dir: str) -> None:
    torch.set_num_threads(THREADS)
    settings = Settings(data_dir=Path(data_dir), ckpt_dirs=(Path(models_dir),), threads=THREADS)
    print(whole(matrix_hashes(build_service(settings))))


if __name__ == "__main__":
    main(*sys.argv[1:3])
