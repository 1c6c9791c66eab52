"""`openpose` (sd-webui-controlnet's body-only OpenPose, ported in
`pipelines.controlnet.openpose`): the network's published key names and shapes, the
decoding of hand-built heatmaps and part affinity fields, the drawing, and the module
through `Annotators` and `/controlnet/detect` with a narrow body model written here as
`annotators/openpose/body_pose_model.pth`.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save_file

from frontends.api.routes import build_controlnet_api
from pipelines.controlnet.annotators import Annotators
from pipelines.controlnet.openpose import (
    BodyPoseModel,
    BodyPoseWidths,
    body_maps,
    connect_limbs,
    detect_people,
    draw_body,
    draw_people,
    find_peaks,
    load_body_pose,
    openpose_map,
    published_key,
)
from pipelines.errors import InvalidRequestError, UnusableFileError
from pipelines.service import Service, build_service
from pipelines.settings import Settings

NARROW = BodyPoseWidths(vgg=(4, 4, 8, 8), cpm=(8, 4), stage1=(4, 8), refine=4)


def published_state(model: BodyPoseModel) -> dict[str, torch.Tensor]:
    """The model's tensors under the file's names (`conv1_1.weight`, ...)."""
    return {published_key(k): v.clone() for k, v in model.state_dict().items()}


def narrow_model(seed: int = 0) -> BodyPoseModel:
    torch.manual_seed(seed)
    return BodyPoseModel(NARROW).eval()


# ------------------------------------------------------------------ 1. the network


def expected_names() -> set[str]:
    """The 92 convolutions of the published body_pose_model.pth, written out by hand."""
    front = ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3"]
    front += ["conv3_4", "conv4_1", "conv4_2", "conv4_3_CPM", "conv4_4_CPM"]
    stage1 = [f"conv5_{i}_CPM_L{b}" for i in range(1, 6) for b in (1, 2)]
    stages = [f"Mconv{i}_stage{s}_L{b}" for i in range(1, 8) for s in range(2, 7) for b in (1, 2)]
    return {f"{name}.{kind}" for name in front + stage1 + stages for kind in ("weight", "bias")}


def test_the_network_has_the_published_names_and_shapes() -> None:
    with torch.device("meta"):  # no memory, no time: names and shapes only
        state = BodyPoseModel().state_dict()
    shapes = {published_key(k): tuple(v.shape) for k, v in state.items()}
    assert set(shapes) == expected_names() and len(shapes) == 184
    assert shapes["conv1_1.weight"] == (64, 3, 3, 3)
    assert shapes["conv4_4_CPM.weight"] == (128, 256, 3, 3)
    assert shapes["conv5_5_CPM_L1.weight"] == (38, 512, 1, 1)
    assert shapes["conv5_5_CPM_L2.weight"] == (19, 512, 1, 1)
    assert shapes["Mconv1_stage2_L1.weight"] == (128, 185, 7, 7)  # 38 + 19 + 128 in
    assert shapes["Mconv7_stage6_L2.weight"] == (19, 128, 1, 1)
    assert sum(v.numel() for v in state.values()) == 52_311_446  # the file's 209 MB


def test_a_published_file_loads_strictly_and_runs(tmp_path: Path) -> None:
    made = narrow_model()
    torch.save(published_state(made), tmp_path / "body_pose_model.pth")
    loaded = load_body_pose(tmp_path / "body_pose_model.pth", "ControlNet/annotators/openpose")
    for key, value in published_state(made).items():
        assert torch.equal(published_state(loaded)[key], value)
    pixels = torch.rand(1, 3, 48, 64)
    with torch.no_grad():
        pafs, heatmaps = loaded(pixels)
    assert pafs.shape == (1, 38, 6, 8) and heatmaps.shape == (1, 19, 6, 8)
    assert heatmaps.min() >= 0  # the published model keeps a ReLU on stage 6's heatmaps
    assert pafs.min() < 0  # ... and none on its fields


@pytest.mark.parametrize(
    ("spoil", "named"),
    [
        (lambda s: s.pop("Mconv3_stage4_L2.bias"), "missing Mconv3_stage4_L2.bias"),
        (lambda s: s.update({"conv9_9.weight": torch.zeros(1)}), "unexpected conv9_9.weight"),
        (lambda s: s.update({"conv1_2.weight": torch.zeros(4, 4, 5, 5)}), "conv1_2.weight"),
    ],
)
def test_a_file_that_does_not_fit_is_refused_naming_it(
    tmp_path: Path, spoil: object, named: str
) -> None:
    state = published_state(narrow_model())
    spoil(state)  # type: ignore[operator]
    save_file(state, tmp_path / "body_pose_model.safetensors")
    with pytest.raises(UnusableFileError, match=named) as refused:
        load_body_pose(tmp_path / "body_pose_model.safetensors", "ControlNet/annotators/openpose")
    assert "ControlNet/annotators/openpose/body_pose_model.safetensors" in str(refused.value)


# ------------------------------------------------------------------ 2. decoding

SIDE = 96
NOSE, NECK, R_SHOULDER, R_ELBOW, L_SHOULDER, L_WRIST, R_EYE = 0, 1, 2, 3, 5, 7, 14


def blob(heatmaps: np.ndarray, part: int, x: int, y: int) -> None:
    """A Gaussian bump of height 1 (sigma 1.5) centred on pixel (x, y) of a part's heatmap."""
    ys, xs = np.mgrid[0:SIDE, 0:SIDE]
    bump = np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 1.5**2))
    heatmaps[:, :, part] = np.maximum(heatmaps[:, :, part], bump)


def paint(pafs: np.ndarray, channels: tuple[int, int], a: tuple[int, int], b: tuple[int, int]):
    """The unit vector a -> b on the pixels within one pixel of the segment a-b."""
    ys, xs = np.mgrid[0:SIDE, 0:SIDE].astype(float)
    direction = np.subtract(b, a) / np.hypot(*np.subtract(b, a))
    along = ((xs - a[0]) * direction[0] + (ys - a[1]) * direction[1]).clip(
        0, np.hypot(*np.subtract(b, a))
    )
    distance = np.hypot(xs - a[0] - along * direction[0], ys - a[1] - along * direction[1])
    near = distance <= 1.0
    pafs[near, channels[0]] = direction[0]
    pafs[near, channels[1]] = direction[1]


# Two people, 50 px apart (nose, neck, shoulders, right elbow), a third with only a neck and
# a nose (too few parts), a stray left wrist with no elbow and a right eye with no field.
# Limb channels (x, y) among the 38 fields: neck-right shoulder 12/13, neck-left shoulder
# 20/21, right shoulder-elbow 14/15, neck-nose 28/29 (`mapIdx` - 19 in the extension's body.py).
PERSON = {NOSE: (20, 20), NECK: (20, 35), R_SHOULDER: (10, 35), R_ELBOW: (10, 50)}
PERSON[L_SHOULDER] = (30, 35)
LIMB_FIELDS = {
    (NECK, R_SHOULDER): (12, 13),
    (NECK, L_SHOULDER): (20, 21),
    (R_SHOULDER, R_ELBOW): (14, 15),
    (NECK, NOSE): (28, 29),
}


def scene_maps() -> tuple[np.ndarray, np.ndarray]:
    heatmaps, pafs = np.zeros((SIDE, SIDE, 19)), np.zeros((SIDE, SIDE, 38))
    for shift in (0, 50):
        for part, (x, y) in PERSON.items():
            blob(heatmaps, part, x + shift, y)
        for (a, b), channels in LIMB_FIELDS.items():
            (xa, ya), (xb, yb) = PERSON[a], PERSON[b]
            paint(pafs, channels, (xa + shift, ya), (xb + shift, yb))
    blob(heatmaps, NECK, 75, 85)
    blob(heatmaps, NOSE, 75, 70)
    paint(pafs, LIMB_FIELDS[(NECK, NOSE)], (75, 85), (75, 70))
    blob(heatmaps, L_WRIST, 88, 10)
    blob(heatmaps, R_EYE, 88, 60)
    return heatmaps, pafs


def test_peaks_are_the_blob_centres_row_by_row() -> None:
    peaks = find_peaks(scene_maps()[0])
    assert [(x, y) for x, y, _, _ in peaks[NOSE]] == [(20, 20), (70, 20), (75, 70)]
    assert [(x, y) for x, y, _, _ in peaks[NECK]] == [(20, 35), (70, 35), (75, 85)]
    assert [(x, y) for x, y, _, _ in peaks[L_WRIST]] == [(88, 10)]
    assert peaks[4] == []  # no right wrist
    assert [peak[3] for peak in peaks[NOSE] + peaks[NECK]] == [0, 1, 2, 3, 4, 5]  # ids run on
    assert all(abs(score - 1.0) < 1e-9 for _, _, score, _ in peaks[NECK])  # unsmoothed


def test_limbs_join_the_ends_their_field_points_along() -> None:
    heatmaps, pafs = scene_maps()
    connections = connect_limbs(find_peaks(heatmaps), pafs, SIDE)
    neck_nose = connections[12]  # limb 12 joins the neck to the nose
    assert neck_nose is not None
    assert sorted((c.index_a, c.index_b) for c in neck_nose) == [(0, 0), (1, 1), (2, 2)]
    assert all(abs(c.score - 1.0) < 1e-9 for c in neck_nose)  # aligned, short: 1
    neck_right = connections[0]
    assert neck_right is not None
    assert sorted((c.index_a, c.index_b) for c in neck_right) == [(0, 0), (1, 1)]
    shoulder_elbow = connections[2]
    assert shoulder_elbow is not None
    assert sorted((c.index_a, c.index_b) for c in shoulder_elbow) == [(0, 0), (1, 1)]
    assert connections[5] is None  # left elbow-wrist: no left elbow at all
    assert connections[13] == []  # nose-right eye: both there, no field between them


def test_people_are_assembled_and_the_small_ones_dropped() -> None:
    people = detect_people(*scene_maps())
    expected = []
    for shift in (0, 50):
        person: list[tuple[float, float] | None] = [None] * 18
        for part, (x, y) in PERSON.items():
            person[part] = (float(x + shift), float(y))
        expected.append(person)
    assert sorted(people, key=lambda p: p[NECK] or (0, 0)) == expected  # no third, no wrist


# ------------------------------------------------------------------ 3. drawing

RED, ORANGE, AMBER = (255, 0, 0), (255, 85, 0), (255, 170, 0)  # colours 0, 1, 2


def test_the_drawing_has_the_documented_colours() -> None:
    keypoints: list[tuple[float, float] | None] = [None] * 18
    keypoints[NECK] = (32 / 64, 20 / 64)
    keypoints[R_SHOULDER] = (16 / 64, 20 / 64)
    canvas = draw_body(np.zeros((64, 64, 3), np.uint8), keypoints)
    assert tuple(canvas[20, 32]) == ORANGE  # joint 1, the neck: colour 1 at full strength
    assert tuple(canvas[20, 16]) == AMBER  # joint 2, the right shoulder
    assert tuple(canvas[20 + 3, 32]) == ORANGE  # a disc of radius 4
    assert tuple(canvas[22, 24]) == (153, 0, 0)  # limb 0 in colour 0, dimmed: 255 * 0.6
    assert tuple(canvas[20 + 7, 24]) == (0, 0, 0)  # sticks are 4 px either side
    lit = np.any(canvas > 0, axis=2)
    assert not lit[:10].any() and not lit[30:].any() and not lit[:, :8].any()  # black


def test_each_person_dims_the_ones_drawn_before() -> None:
    first: list[tuple[float, float] | None] = [None] * 18
    second: list[tuple[float, float] | None] = [None] * 18
    first[NOSE], second[NOSE] = (0.25, 0.5), (0.75, 0.5)
    canvas = draw_people([first, second], 64, 64)
    assert tuple(canvas[32, 16]) == (153, 0, 0)  # the extension dims the whole canvas
    assert tuple(canvas[32, 48]) == RED


# ------------------------------------------------------------------ 4. inference and module


def test_the_maps_come_back_at_the_image_size_where_the_network_put_them() -> None:
    """A stand-in network that answers a peak on output cell (row 5, column 8) of the
    nose heatmap: the image (64 x 96) is scaled to 184 x 276 and padded to 184 x 280, the
    output cell (8 px each) is grown x8 and cut, then shrunk by 64 / 184."""

    def network(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert tuple(pixels.shape) == (1, 3, 184, 280)
        assert torch.allclose(pixels[0, :, :, 276:], torch.tensor(128 / 256 - 0.5))  # padded
        heatmaps = torch.zeros(1, 19, 23, 35)
        heatmaps[0, NOSE, 5, 8] = 1.0
        return torch.zeros(1, 38, 23, 35), heatmaps

    heatmaps, pafs = body_maps(network, np.zeros((64, 96, 3), np.uint8), torch.device("cpu"))
    assert heatmaps.shape == (64, 96, 19) and pafs.shape == (64, 96, 38)
    row, column = np.unravel_index(np.argmax(heatmaps[:, :, NOSE]), (64, 96))
    # the cell's centre: (8 * 8 + 3.5, 5 * 8 + 3.5) network pixels, x 64 / 184 on the image
    assert abs(column - 67.5 * 64 / 184) <= 1 and abs(row - 43.5 * 64 / 184) <= 1


def test_the_map_draws_the_pose_the_network_finds() -> None:
    """The whole preprocessor with a stand-in network that finds a nose, a neck and two
    shoulders (3 x 3 output cells each) joined by constant fields: each joint's disc is
    drawn where its cell lies on the image, in its colour."""
    cells = {NOSE: (3, 11), NECK: (8, 11), R_SHOULDER: (8, 6), L_SHOULDER: (8, 16)}
    directions = {(12, 13): (-1, 0), (20, 21): (1, 0), (28, 29): (0, -1)}  # from the neck

    def network(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert tuple(pixels.shape) == (1, 3, 184, 184)  # 64 px scaled to 0.5 x 368
        blue, red = pixels[0, 0, 0, 0], pixels[0, 2, 0, 0]
        assert blue == -0.5 and red == 255 / 256 - 0.5  # BGR, / 256 - 0.5
        heatmaps, pafs = torch.zeros(1, 19, 23, 23), torch.zeros(1, 38, 23, 23)
        for part, (row, column) in cells.items():
            heatmaps[0, part, row - 1 : row + 2, column - 1 : column + 2] = 1.0
        for (x, y), (dx, dy) in directions.items():
            pafs[0, x], pafs[0, y] = dx, dy
        return pafs, heatmaps

    image = np.zeros((64, 64, 3), np.uint8)
    image[:, :, 0] = 255  # red
    made = openpose_map(network, image, 64, torch.device("cpu"))
    assert made.shape == (64, 64, 3)
    colors = {NOSE: RED, NECK: ORANGE, R_SHOULDER: AMBER, L_SHOULDER: (85, 255, 0)}
    for part, (row, column) in cells.items():
        # a cell's centre, (8 c + 4) network pixels, x 64 / 184 on the image (discs: 4 px)
        x, y = round((8 * column + 4) * 64 / 184), round((8 * row + 4) * 64 / 184)
        assert tuple(made[y, x]) == colors[part], part
    assert not np.any(made[50:]) and not np.any(made[:, :10])  # black away from the pose


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("openpose-ControlNet")
    (folder / "annotators" / "openpose").mkdir(parents=True)
    weights = folder / "annotators" / "openpose" / "body_pose_model.pth"
    torch.save(published_state(narrow_model()), weights)
    return folder


def test_listed_when_the_file_is_there_and_named_when_not(
    tmp_path: Path, controlnet_dir: Path
) -> None:
    ready = Annotators([tmp_path, controlnet_dir])
    assert "openpose" in [p.name for p in ready.modules()]
    assert "openpose" not in dict(ready.unavailable())
    empty = Annotators([tmp_path])
    reason = dict(empty.unavailable())["openpose"]
    assert "body_pose_model.pth" in reason and "annotators/openpose/" in reason
    with pytest.raises(InvalidRequestError, match="body_pose_model.pth") as refused:
        empty.find("openpose", "controlnet[0].module")
    assert refused.value.field == "controlnet[0].module"


def test_the_safetensors_form_runs_and_a_corrupt_file_is_named(
    tmp_path: Path, controlnet_dir: Path
) -> None:
    folder = tmp_path / "annotators" / "openpose"
    folder.mkdir(parents=True)
    save_file(published_state(narrow_model()), folder / "body_pose_model.safetensors")
    image = (np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)
    made = Annotators([tmp_path]).find("openpose")(image, 64, -1, -1)
    from_pth = Annotators([controlnet_dir]).find("openpose")(image, 64, -1, -1)  # same weights
    assert made.shape == (64, 64, 3) and np.array_equal(made, from_pth)
    (folder / "body_pose_model.pth").write_bytes(b"not a pickle")  # the .pth wins
    reason = dict(Annotators([tmp_path]).unavailable())["openpose"]
    assert f"{tmp_path.name}/annotators/openpose/body_pose_model.pth" in reason
    assert str(tmp_path.parent) not in reason  # no host path for clients


def test_a_safetensors_file_without_the_published_keys_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "annotators" / "openpose"
    folder.mkdir(parents=True)
    save_file({"conv1_1.weight": torch.zeros(1)}, folder / "body_pose_model.safetensors")
    reason = dict(Annotators([tmp_path]).unavailable())["openpose"]
    named = f"{tmp_path.name}/annotators/openpose/body_pose_model.safetensors"
    assert reason == f"{named}: not OpenPose's body model (no Mconv7_stage6_L2.weight)"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, controlnet_dir: Path) -> Service:
    data = tmp_path_factory.mktemp("openpose-data")
    settings = Settings(
        data_dir=data, ckpt_dirs=(data / "models",), controlnet_dir=controlnet_dir, threads=2
    )
    return build_service(settings)


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[TestClient]:
    with TestClient(build_controlnet_api(service, service.settings)) as made:
        yield made


def test_detect_route_runs_the_module(client: TestClient, controlnet_dir: Path) -> None:
    image = (np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    body = {
        "controlnet_module": "openpose",
        "controlnet_input_images": [base64.b64encode(buffer.getvalue()).decode()],
        "controlnet_processor_res": 128,  # the slider's minimum
    }
    answer = client.post("/detect", json=body)
    assert answer.status_code == 200, answer.text
    made = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0]))))
    expected = Annotators([controlnet_dir]).find("openpose")(image, 128, -1, -1)
    assert made.shape == (128, 160, 3) and np.array_equal(made[:, :, :3], expected)
    assert "openpose" in client.get("/module_list").json()["module_list"]
