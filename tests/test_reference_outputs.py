"""Engine v2 regression: every sampler's image equals the pre-refactor engine's.

The images in `fixtures/reference-outputs.npz` were made by the first engine (see
`tests/reference_cases.py`); the same requests through the service must give the same
pixels within 1/255 (2 torch threads, as recorded).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.loading import LoadedModel
from pipelines.service import Service, build_service
from pipelines.settings import Settings
from tests.reference_cases import reference_cases
from tests.test_lora import SD1_MODULES, make_kohya, sd1_keys, write

REFERENCE = Path(__file__).parent / "fixtures" / "reference-outputs.npz"


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, tiny_sd1: LoadedModel
) -> Service:
    data = tmp_path_factory.mktemp("reference")
    loras = data / "loras"
    write(
        loras / "ink.safetensors",
        make_kohya(tiny_sd1.pipe, SD1_MODULES, sd1_keys(SD1_MODULES), seed=1),
    )
    settings = Settings(data_dir=data, ckpt_dirs=(models_dir,), lora_dirs=(loras,), threads=2)
    return build_service(settings)


@pytest.mark.parametrize("name", [name for name, _ in reference_cases()])
def test_same_pixels_as_before_the_refactor(
    service: Service, name: str, record_property: Callable[[str, object], None]
) -> None:
    torch.set_num_threads(2)
    request = dict(reference_cases())[name]
    result = service.generate(request)
    made = np.stack([np.asarray(image.convert("RGB")) for image in result.images])
    expected = np.load(REFERENCE)[name]
    assert made.shape == expected.shape
    difference = np.abs(made.astype(int) - expected.astype(int)).max()
    record_property("max_difference_of_255", int(difference))  # for the resolution note
    assert difference <= 1, f"{name}: differs by up to {difference}/255"
