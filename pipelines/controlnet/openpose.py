"""sd-webui-controlnet's `openpose` preprocessor (body only), without controlnet-aux.

Ported from the `annotator/openpose` code of lllyasviel's ControlNet as sd-webui-controlnet
carries it (`model.py`, `body.py`, `util.py`, `__init__.py`; Apache-2.0; itself from Hzzone's
pytorch-openpose, after CMU's OpenPose, whose header in those files says the preprocessor
is licensed by CMU for non-commercial use). The network, the inference and the drawing are
theirs; the code here is written anew around them:

1. `BodyPoseModel`: CMU's body network (VGG-19 front, then six two-branch stages: 38 part
   affinity fields, L1, and 19 heatmaps, L2). Its modules carry the published layer names,
   so `body_pose_model.pth` (lllyasviel/Annotators; keys such as `conv1_1.weight`) loads
   strictly; widths are read from the file's tensors.
2. `body_maps`: the image (BGR, as the extension hands it over) scaled to 0.5 x 368 px
   high, padded right and down to a multiple of 8 with 128, pixels / 256 - 0.5; the outputs
   resized x8 (Lanczos), cut, and resized to the image (`smart_resize`).
3. `find_peaks`, `connect_limbs`, `assemble_people`: peaks of each heatmap smoothed with a
   Gaussian (sigma 3) above 0.1; limbs scored along their part affinity field (10 samples);
   people grown limb by limb; people with fewer than 4 parts or a mean score below 0.4
   dropped.
4. `draw_body`: on a black canvas, each limb an ellipse of half-width 4 px in its colour,
   the canvas dimmed to 60 %, then each joint a disc of radius 4 in its colour.

`openpose_map` is the whole preprocessor: the image at the processor resolution with edge
padding to a multiple of 64 (`resize_image_with_pad`), the steps above on the padded image,
the padding cut off.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from pipelines.controlnet.preprocessors import (
    ImageArray,
    at_resolution,
    pad_to_64,
    read_annotator_file,
)
from pipelines.errors import UnusableFileError
from pipelines.safeload import load_state_dict

BODY_POSE_FILE = "body_pose_model.pth"
"""The file sd-webui-controlnet downloads from lllyasviel/Annotators."""
BODY_POSE_SAFETENSORS = "body_pose_model.safetensors"
"""The same tensors as safetensors (same keys)."""

PAF_CHANNELS, HEATMAP_CHANNELS = 38, 19
STAGES = 6

Keypoint = tuple[float, float] | None
"""A joint's (x, y), or None when not found."""
Peak = tuple[int, int, float, int]
"""(x, y, score, id) of one heatmap peak; ids run over all parts."""

LIMBS: tuple[tuple[int, int], ...] = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11),
    (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (2, 16), (5, 17),
)  # fmt: skip
"""The 19 limbs as (part A, part B), parts 0-based in OpenPose's COCO-18 order (nose, neck,
right shoulder, elbow, wrist, left shoulder, elbow, wrist, right hip, knee, ankle, left hip,
knee, ankle, right eye, left eye, right ear, left ear). The first 17 are drawn."""
LIMB_PAFS: tuple[tuple[int, int], ...] = (
    (12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5),
    (6, 7), (8, 9), (10, 11), (28, 29), (30, 31), (34, 35), (32, 33), (36, 37), (18, 19),
    (26, 27),
)  # fmt: skip
"""Each limb's (x, y) channels among the 38 part affinity fields."""
COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
"""RGB: joint i and drawn limb i take colour i."""
DRAWN_LIMBS = 17
STICK_WIDTH = 4
JOINT_RADIUS = 4

# ------------------------------------------------------------------ 1. the network


@dataclass(frozen=True)
class BodyPoseWidths:
    """Channel widths of the body network; the published file's are the defaults (tests
    build narrow ones)."""

    vgg: tuple[int, int, int, int] = (64, 128, 256, 512)
    cpm: tuple[int, int] = (256, 128)
    stage1: tuple[int, int] = (128, 512)
    refine: int = 128


Layer = tuple[str, int, int, int]
"""(name, in channels, out channels, kernel size); a name with `pool` is a 2x2 max-pool."""


def _front_layers(w: BodyPoseWidths) -> list[Layer]:
    c1, c2, c3, c4 = w.vgg
    return [
        ("conv1_1", 3, c1, 3), ("conv1_2", c1, c1, 3), ("pool1_stage1", 0, 0, 0),
        ("conv2_1", c1, c2, 3), ("conv2_2", c2, c2, 3), ("pool2_stage1", 0, 0, 0),
        ("conv3_1", c2, c3, 3), ("conv3_2", c3, c3, 3), ("conv3_3", c3, c3, 3),
        ("conv3_4", c3, c3, 3), ("pool3_stage1", 0, 0, 0),
        ("conv4_1", c3, c4, 3), ("conv4_2", c4, c4, 3),
        ("conv4_3_CPM", c4, w.cpm[0], 3), ("conv4_4_CPM", w.cpm[0], w.cpm[1], 3),
    ]  # fmt: skip


def _stage_layers(w: BodyPoseWidths, stage: int, branch: int) -> list[Layer]:
    out = PAF_CHANNELS if branch == 1 else HEATMAP_CHANNELS
    if stage == 1:
        width, wide = w.stage1
        names = [f"conv5_{i}_CPM_L{branch}" for i in range(1, 6)]
        sizes = [(w.cpm[1], width, 3), (width, width, 3), (width, width, 3), (width, wide, 1)]
        sizes.append((wide, out, 1))
    else:
        width, joined = w.refine, PAF_CHANNELS + HEATMAP_CHANNELS + w.cpm[1]
        names = [f"Mconv{i}_stage{stage}_L{branch}" for i in range(1, 8)]
        sizes = [(joined, width, 7)] + [(width, width, 7)] * 4 + [(width, width, 1)]
        sizes.append((width, out, 1))
    return [(name, *size) for name, size in zip(names, sizes, strict=True)]


def _no_relu(name: str) -> bool:
    """The last convolution of each branch has no ReLU, except stage 6's heatmaps: the
    published model's list names `Mconv7_stage6_L1` twice and never `..._L2`, so that one
    keeps its ReLU (negative heatmap values never make peaks anyway)."""
    return name.startswith("conv5_5_CPM") or (
        name.startswith("Mconv7_") and name != f"Mconv7_stage{STAGES}_L2"
    )


def _sequential(layers: list[Layer]) -> nn.Sequential:
    made: list[tuple[str, nn.Module]] = []
    for name, channels_in, channels_out, kernel in layers:
        if "pool" in name:
            made.append((name, nn.MaxPool2d(kernel_size=2, stride=2, padding=0)))
            continue
        made.append((name, nn.Conv2d(channels_in, channels_out, kernel, 1, kernel // 2)))
        if not _no_relu(name):
            made.append((f"relu_{name}", nn.ReLU()))
    return nn.Sequential(OrderedDict(made))


class BodyPoseModel(nn.Module):
    """CMU's body pose network as `bodypose_model`: `model0` the front, `model{s}_{b}` stage
    s branch b (1: part affinity fields, 2: heatmaps). [B, 3, H, W] -> ([B, 38, H/8, W/8],
    [B, 19, H/8, W/8])."""

    def __init__(self, widths: BodyPoseWidths | None = None) -> None:
        super().__init__()
        widths = widths or BodyPoseWidths()
        self.model0 = _sequential(_front_layers(widths))
        for stage in range(1, STAGES + 1):
            for branch in (1, 2):
                layers = _stage_layers(widths, stage, branch)
                self.add_module(f"model{stage}_{branch}", _sequential(layers))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model0(pixels)
        joined = features
        for stage in range(1, STAGES + 1):
            pafs = getattr(self, f"model{stage}_1")(joined)
            heatmaps = getattr(self, f"model{stage}_2")(joined)
            joined = torch.cat([pafs, heatmaps, features], dim=1)
        return pafs, heatmaps


def published_key(key: str) -> str:
    """The file's name of a module key: without the block (`model0.conv1_1.weight` ->
    `conv1_1.weight`), as the extension's `util.transfer` maps it."""
    return key.split(".", 1)[1]


def widths_of(state: dict[str, torch.Tensor]) -> BodyPoseWidths:
    """The widths a published-layout state dict was trained with (from its shapes)."""

    def out(name: str) -> int:
        return int(state[f"{name}.weight"].shape[0])

    return BodyPoseWidths(
        vgg=(out("conv1_1"), out("conv2_1"), out("conv3_1"), out("conv4_1")),
        cpm=(out("conv4_3_CPM"), out("conv4_4_CPM")),
        stage1=(out("conv5_1_CPM_L1"), out("conv5_4_CPM_L1")),
        refine=out("Mconv1_stage2_L1"),
    )


def load_body_pose(path: Path, shown: str) -> BodyPoseModel:
    """The body network of `body_pose_model.pth` (read with `weights_only`) or its
    `.safetensors` twin, float32, CPU, eval; loaded strictly, a file that does not fit is
    an `UnusableFileError` naming it (`shown`) and the keys."""
    state = read_annotator_file("openpose", shown, path, load_state_dict)
    with torch.device("meta"):  # names only: no memory, no time
        expected = [published_key(key) for key in BodyPoseModel().state_dict()]
    missing = [key for key in expected if key not in state]
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        found = (f"missing {', '.join(missing[:4])}" if missing else "") + (
            f"{'; ' if missing else ''}unexpected {', '.join(unexpected[:4])}" if unexpected else ""
        )
        raise UnusableFileError(
            f"preprocessor openpose: {shown}/{path.name} is not OpenPose's body model ({found})",
            field="module",
        )
    try:
        model = BodyPoseModel(widths_of(state))
        module_keys = {published_key(key): key for key in model.state_dict()}
        model.load_state_dict(
            {module_keys[k]: v.to(torch.float32) for k, v in state.items()}, strict=True
        )
    except (ValueError, TypeError, RuntimeError) as error:
        raise UnusableFileError(
            f"preprocessor openpose: {shown}/{path.name} does not fit OpenPose's body model: "
            f"{error}",
            field="module",
        ) from error
    return model.eval()


# ------------------------------------------------------------------ 2. heatmaps and fields

BOX_SIZE, SCALE, STRIDE, PAD_VALUE = 368, 0.5, 8, 128


def smart_resize(
    array: np.ndarray, width: int, height: int, ratio: float | None = None
) -> np.ndarray:
    """The extension's `smart_resize`: INTER_AREA when shrinking (`ratio`, by default the
    sum of the new sides over the old), Lanczos otherwise; an image at once, other arrays
    channel by channel. [H, W, C] -> [height, width, C]."""
    old_h, old_w = array.shape[:2]
    if ratio is None:
        ratio = float(height + width) / float(old_h + old_w)
    interpolation = cv2.INTER_AREA if ratio < 1 else cv2.INTER_LANCZOS4
    if array.shape[2] == 3:
        return cv2.resize(array, (width, height), interpolation=interpolation)
    channels = [
        cv2.resize(array[:, :, c], (width, height), interpolation=interpolation)
        for c in range(array.shape[2])
    ]
    return np.stack(channels, axis=2)


def network_input(bgr: ImageArray) -> tuple[torch.Tensor, tuple[int, int]]:
    """`Body.__call__`'s input: the image scaled to 0.5 x 368 px high, padded right and down
    to a multiple of 8 with 128, pixels / 256 - 0.5 ([1, 3, h, w]), and the unpadded size."""
    height, width = bgr.shape[:2]
    scale = SCALE * BOX_SIZE / height
    scaled = smart_resize(bgr, int(width * scale), int(height * scale), ratio=scale)
    small_h, small_w = scaled.shape[:2]
    padded = np.full(
        (small_h + -small_h % STRIDE, small_w + -small_w % STRIDE, 3), PAD_VALUE, np.uint8
    )
    padded[:small_h, :small_w] = scaled
    pixels = torch.from_numpy(padded.astype(np.float32) / 256 - 0.5)
    return pixels.permute(2, 0, 1)[None].contiguous(), (small_h, small_w)


def body_maps(
    model: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    bgr: ImageArray,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """The heatmaps [H, W, 19] and part affinity fields [H, W, 38] at the image's size."""
    height, width = bgr.shape[:2]
    pixels, (small_h, small_w) = network_input(bgr)
    with torch.inference_mode():
        pafs, heatmaps = model(pixels.to(device))

    def at_image_size(output: torch.Tensor) -> np.ndarray:
        maps = output[0].permute(1, 2, 0).to(torch.float32).cpu().numpy()  # [h/8, w/8, C]
        grown = smart_resize(maps, maps.shape[1] * STRIDE, maps.shape[0] * STRIDE)
        return smart_resize(grown[:small_h, :small_w], width, height).astype(np.float64)

    return at_image_size(heatmaps), at_image_size(pafs)


# ------------------------------------------------------------------ 3. people

PEAK_THRESHOLD, PAF_THRESHOLD, PAF_SAMPLES = 0.1, 0.05, 10


def find_peaks(heatmaps: np.ndarray) -> list[list[Peak]]:
    """Per part (18), the pixels of its Gaussian-smoothed (sigma 3) heatmap that are at
    least their four neighbours (outside the image: 0) and above 0.1, row by row; the
    score is the unsmoothed heatmap there."""
    from scipy.ndimage import gaussian_filter

    peaks: list[list[Peak]] = []
    counter = 0
    for part in range(HEATMAP_CHANNELS - 1):
        raw = heatmaps[:, :, part]
        smooth = gaussian_filter(raw, sigma=3)
        padded = np.pad(smooth, 1)  # [H + 2, W + 2], zeros around
        top, bottom = padded[:-2, 1:-1], padded[2:, 1:-1]
        left, right = padded[1:-1, :-2], padded[1:-1, 2:]
        is_peak = (
            (smooth >= top)
            & (smooth >= bottom)
            & (smooth >= left)
            & (smooth >= right)
            & (smooth > PEAK_THRESHOLD)
        )
        ys, xs = np.nonzero(is_peak)
        found = [
            (int(x), int(y), float(raw[y, x]), counter + index)
            for index, (y, x) in enumerate(zip(ys, xs, strict=True))
        ]
        peaks.append(found)
        counter += len(found)
    return peaks


@dataclass(frozen=True)
class Connection:
    """One accepted limb: the peak ids of its ends, its score, and the ends' indexes among
    their part's peaks."""

    id_a: int
    id_b: int
    score: float
    index_a: int
    index_b: int


def limb_scores(
    ends_a: list[Peak], ends_b: list[Peak], field: np.ndarray, height: int
) -> np.ndarray:
    """Each limb a -> b's score along its field [H, W, 2]: the mean alignment at 10
    samples, less a penalty when longer than half the image; NaN when fewer than 80 % of
    the samples pass 0.05 or the score is not positive. All pairs at once, in the same
    arithmetic as the extension's loop (a Python `sum` is a running sum). -> [nA, nB]."""
    a = np.array([peak[:2] for peak in ends_a], dtype=np.float64)[:, None, :]  # [nA, 1, 2]
    b = np.array([peak[:2] for peak in ends_b], dtype=np.float64)[None, :, :]  # [1, nB, 2]
    delta = b - a  # [nA, nB, 2]
    norm = np.maximum(0.001, np.sqrt(delta[..., 0] ** 2 + delta[..., 1] ** 2))  # [nA, nB]
    direction = delta / norm[..., None]
    steps = np.arange(PAF_SAMPLES, dtype=np.float64)[:, None, None, None] / (PAF_SAMPLES - 1)
    samples = a + steps * delta  # [10, nA, nB, 2]; never within 1/18 of a rounding tie
    samples[-1] = np.broadcast_to(b, samples[-1].shape)
    cols, rows = np.round(samples[..., 0]).astype(int), np.round(samples[..., 1]).astype(int)
    alignment = field[rows, cols, 0] * direction[..., 0] + field[rows, cols, 1] * direction[..., 1]
    total = alignment[0].copy()
    for sample in alignment[1:]:
        total += sample
    score = total / PAF_SAMPLES + np.minimum(0.5 * height / norm - 1, 0)
    passing = np.count_nonzero(alignment > PAF_THRESHOLD, axis=0) > 0.8 * PAF_SAMPLES
    return np.where(passing & (score > 0), score, np.nan)


def connect_limbs(
    peaks: list[list[Peak]], pafs: np.ndarray, height: int
) -> list[list[Connection] | None]:
    """Per limb, its connections: candidates by score, best first, each peak used once,
    at most as many as the rarer end has peaks. None: an end has no peaks at all."""
    connections: list[list[Connection] | None] = []
    for (part_a, part_b), channels in zip(LIMBS, LIMB_PAFS, strict=True):
        ends_a, ends_b = peaks[part_a], peaks[part_b]
        if not ends_a or not ends_b:
            connections.append(None)
            continue
        scores = limb_scores(ends_a, ends_b, pafs[:, :, list(channels)], height)
        found = np.nonzero(~np.isnan(scores))  # row by row, as the extension's loops
        candidates = [(int(i), int(j), float(scores[i, j])) for i, j in zip(*found, strict=True)]
        candidates.sort(key=lambda candidate: candidate[2], reverse=True)  # stable
        chosen: list[Connection] = []
        for i, j, score in candidates:
            if all(i != c.index_a and j != c.index_b for c in chosen):
                chosen.append(Connection(ends_a[i][3], ends_b[j][3], score, i, j))
                if len(chosen) >= min(len(ends_a), len(ends_b)):
                    break
        connections.append(chosen)
    return connections


PARTS = HEATMAP_CHANNELS - 1  # 18; a person row also holds its score and part count
GROWN_LIMBS = 17  # the ear-shoulder limbs join people but never start one


def assemble_people(
    peaks: list[list[Peak]], connections: list[list[Connection] | None]
) -> list[list[Keypoint]]:
    """People as 18 keypoints each (pixels), grown limb by limb as `Body.__call__` does: a
    connection extends the person holding one of its ends, joins two people that share no
    part, or (first 17 limbs) starts a person; people with fewer than 4 parts or a mean
    score below 0.4 are dropped."""
    candidates = [peak for part in peaks for peak in part]
    people = np.zeros((0, PARTS + 2)) - 1  # [N, 20]: peak ids, total score, part count
    for limb, found in enumerate(connections):
        if found is None:
            continue
        part_a, part_b = LIMBS[limb]
        for connection in found:
            holders = [
                row
                for row in range(len(people))
                if people[row][part_a] == connection.id_a or people[row][part_b] == connection.id_b
            ]
            if len(holders) == 1 or (len(holders) >= 2 and _overlap(people, holders[:2])):
                row = holders[0]
                if len(holders) >= 2 or people[row][part_b] != connection.id_b:
                    people[row][part_b] = connection.id_b
                    people[row][-1] += 1
                    people[row][-2] += candidates[connection.id_b][2] + connection.score
            elif len(holders) >= 2:  # two people sharing no part: one person
                first, second = holders[:2]
                people[first][:-2] += people[second][:-2] + 1
                people[first][-2:] += people[second][-2:]
                people[first][-2] += connection.score
                people = np.delete(people, second, 0)
            elif limb < GROWN_LIMBS:
                row_values = -1 * np.ones(PARTS + 2)
                row_values[part_a], row_values[part_b] = connection.id_a, connection.id_b
                row_values[-1] = 2
                row_values[-2] = (
                    candidates[connection.id_a][2]
                    + candidates[connection.id_b][2]
                    + connection.score
                )
                people = np.vstack([people, row_values])
    kept = [row for row in people if row[-1] >= 4 and row[-2] / row[-1] >= 0.4]
    return [
        [
            (float(candidates[int(i)][0]), float(candidates[int(i)][1])) if i >= 0 else None
            for i in row[:PARTS]
        ]
        for row in kept
    ]


def _overlap(people: np.ndarray, rows: list[int]) -> bool:
    """Whether two people hold a part each (then they are not merged)."""
    both = (people[rows[0]] >= 0).astype(int) + (people[rows[1]] >= 0).astype(int)
    return bool(np.any(both[:-2] == 2))


def detect_people(heatmaps: np.ndarray, pafs: np.ndarray) -> list[list[Keypoint]]:
    """People (18 keypoints in pixels each) from heatmaps [H, W, 19] and fields [H, W, 38]."""
    peaks = find_peaks(heatmaps)
    return assemble_people(peaks, connect_limbs(peaks, pafs, heatmaps.shape[0]))


# ------------------------------------------------------------------ 4. drawing


def draw_body(canvas: ImageArray, keypoints: list[Keypoint]) -> ImageArray:
    """The extension's `draw_bodypose` for one person, keypoints normalised to 0..1: limbs
    as filled ellipses (half-width 4), the canvas dimmed to 60 %, joints as discs (radius 4)."""
    height, width = canvas.shape[:2]
    for (part_a, part_b), color in zip(LIMBS[:DRAWN_LIMBS], COLORS, strict=False):
        a, b = keypoints[part_a], keypoints[part_b]
        if a is None or b is None:
            continue
        xs = np.array([a[0], b[0]]) * float(width)
        ys = np.array([a[1], b[1]]) * float(height)
        length = ((ys[0] - ys[1]) ** 2 + (xs[0] - xs[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
        center = (int(np.mean(xs)), int(np.mean(ys)))
        polygon = cv2.ellipse2Poly(center, (int(length / 2), STICK_WIDTH), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, color)
    canvas = (canvas * 0.6).astype(np.uint8)
    for keypoint, color in zip(keypoints, COLORS, strict=False):
        if keypoint is not None:
            center = (int(keypoint[0] * width), int(keypoint[1] * height))
            cv2.circle(canvas, center, JOINT_RADIUS, color, thickness=-1)
    return canvas


def draw_people(people: list[list[Keypoint]], height: int, width: int) -> ImageArray:
    """Every person on one black canvas (`draw_poses`, body only). uint8 [H, W, 3] RGB."""
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for keypoints in people:
        canvas = draw_body(canvas, keypoints)
    return canvas


def openpose_map(
    model: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    image: ImageArray,
    resolution: int,
    device: torch.device,
) -> ImageArray:
    """sd-webui-controlnet's `openpose` map of an RGB image (see the module docstring)."""
    padded, cut = pad_to_64(at_resolution(image, resolution))
    height, width = padded.shape[:2]
    bgr = np.ascontiguousarray(padded[:, :, ::-1])  # the detector reads BGR
    people = detect_people(*body_maps(model, bgr, device))
    normalised = [
        [(p[0] / float(width), p[1] / float(height)) if p else None for p in person]
        for person in people
    ]
    return cut(draw_people(normalised, height, width))
