"""The X/Y/Z plot (A1111 1.10's script): axis indices as A1111's API sends them, value
ranges, cell order that prepares each LoRA stack once, cells equal to the same requests run
alone, the grid's geometry and legend, and its infotext."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipelines.errors import InvalidRequestError
from pipelines.infotext import parse_infotext
from pipelines.loading import LoadedModel
from pipelines.lora.stack import AdapterStack
from pipelines.schema import Bounds, GenerationRequest, HiresFix, LoraSpec
from pipelines.service import Service, build_service
from pipelines.settings import Settings
from pipelines.xyz import (
    AxisSpec,
    XyzPlot,
    axes_for,
    expand_numbers,
    find_axis,
    format_value,
    lora_weight,
    plan_grid,
    run_xyz,
    xyz_from_script_args,
)
from tests.test_lora import SD1_MODULES, make_kohya, sd1_keys, write

BASE = GenerationRequest(prompt="a red tower", steps=2, width=64, height=64, seed=11)


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, tiny_sd1: LoadedModel
) -> Service:
    data = tmp_path_factory.mktemp("xyz")
    loras = data / "loras"
    write(
        loras / "ink.safetensors",
        make_kohya(tiny_sd1.pipe, SD1_MODULES, sd1_keys(SD1_MODULES), seed=1),
    )
    settings = Settings(data_dir=data, ckpt_dirs=(models_dir,), lora_dirs=(loras,), threads=2)
    return build_service(settings)


def test_axis_indices_are_a1111_1_10s() -> None:
    txt2img = [axis.label for axis in axes_for(img2img=False)]
    wanted = {0: "Nothing", 1: "Seed", 4: "Steps", 5: "Hires steps", 6: "CFG Scale"}
    wanted |= {7: "Prompt S/R", 9: "Sampler", 10: "Hires sampler", 11: "Checkpoint name"}
    wanted |= {17: "Schedule type", 24: "Clip skip", 25: "Denoising", 28: "Hires upscaler"}
    wanted |= {39: "RNG source", 41: "Size", 42: "LoRA weight"}
    assert {index: txt2img[index] for index in wanted} == wanted and len(txt2img) == 43
    img2img = [axis.label for axis in axes_for(img2img=True)]
    assert (img2img[6], img2img[7], img2img[9], img2img[10]) == (
        "Image CFG Scale",
        "Prompt S/R",
        "Sampler",
        "Checkpoint name",
    )
    assert "Hires steps" not in img2img and img2img[-1] == "LoRA weight"
    with pytest.raises(InvalidRequestError, match="'Eta' axis is not implemented"):
        find_axis(23, img2img=False)
    with pytest.raises(InvalidRequestError, match="axis index 99"):
        find_axis(99, img2img=False)
    assert find_axis("cfg scale", img2img=False).label == "CFG Scale"


def test_ranges_as_a1111() -> None:
    assert expand_numbers(["1-5"], int) == [1, 2, 3, 4, 5]
    assert expand_numbers(["1-10 (+3)", "20"], int) == [1, 4, 7, 10, 20]
    assert expand_numbers(["10-1 (-4)"], int) == [10, 6]  # A1111: range(10, 1 + 1, -4)
    assert expand_numbers(["1-9 [3]"], int) == [1, 5, 9]
    assert expand_numbers(["0.2-1 [5]"], float) == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert expand_numbers(["1-2 (+0.5)"], float) == [1.0, 1.5, 2.0]
    with pytest.raises(InvalidRequestError, match="'abc' is not a int"):
        expand_numbers(["abc"], int, "Steps")


def test_styles_axis_adds_the_names_to_the_requests_styles() -> None:
    base = replace(BASE, styles=("frame",))
    plot = XyzPlot(x=AxisSpec("Styles", '"tail, film", none'))
    cells = plan_grid(base, plot, Bounds()).cells
    assert [c.request.styles for c in cells] == [("frame", "tail", "film"), ("frame", "none")]


def test_refiner_axes_set_the_refiner_fields() -> None:
    plot = XyzPlot(
        x=AxisSpec("Refiner checkpoint", "None, xl/refiner.safetensors"),
        y=AxisSpec("Refiner switch at", "0.5, 0.8"),
    )
    cells = plan_grid(BASE, plot, Bounds()).cells
    got = {(c.request.refiner_checkpoint, c.request.refiner_switch_at) for c in cells}
    assert got == {(r, s) for r in (None, "xl/refiner.safetensors") for s in (0.5, 0.8)}
    axis = find_axis("Refiner checkpoint", img2img=True)
    assert format_value(axis, "xl/refiner.safetensors") == "refiner.safetensors"


def test_lora_weight_overrides_a_tag_or_a_row_or_adds_one() -> None:
    tagged = replace(BASE, prompt="x <lora:ink:0.3> y <lora:other:1>")
    assert lora_weight(tagged, "ink", 0.75).prompt == "x <lora:ink:0.75> y <lora:other:1>"
    rows = replace(BASE, loras=(LoraSpec("ink", 0.3, 0.1), LoraSpec("glow", 1)))
    assert lora_weight(rows, "ink", 0.5).loras == (LoraSpec("ink", 0.5), LoraSpec("glow", 1))
    assert lora_weight(BASE, "ink", -1).loras == (LoraSpec("ink", -1),)


def test_script_args_and_cell_requests() -> None:
    args = [4, "1,2", [], 7, "red, blue", [], 0, "", []]
    args += [True, False, False, False, False, True, False, 0, False]
    plot = xyz_from_script_args(args)
    assert plot.x == AxisSpec(4, "1,2") and plot.vary_seeds_y and not plot.vary_seeds_x
    plan = plan_grid(BASE, plot, Bounds())
    got = {(c.ix, c.iy): (c.request.steps, c.request.prompt, c.request.seed) for c in plan.cells}
    # vary seeds for Y: each row adds len(xs) to the seed, as A1111
    assert got == {
        (0, 0): (1, "a red tower", 11),
        (1, 0): (2, "a red tower", 11),
        (0, 1): (1, "a blue tower", 13),
        (1, 1): (2, "a blue tower", 13),
    }
    with pytest.raises(InvalidRequestError, match="Prompt S/R did not find green"):
        plan_grid(BASE, replace(plot, y=AxisSpec(7, "green, blue")), Bounds())
    with pytest.raises(InvalidRequestError, match="needs Hires fix"):
        plan_grid(BASE, replace(plot, x=AxisSpec("Hires steps", "1,2")), Bounds())
    hires = replace(BASE, hires=HiresFix(scale=1.5))
    cells = plan_grid(hires, replace(plot, x=AxisSpec(5, "1,2")), Bounds()).cells
    assert {c.request.hires.second_pass_steps for c in cells if c.request.hires} == {1, 2}
    with pytest.raises(InvalidRequestError, match="exceed the grid limit"):
        plan_grid(
            replace(BASE, width=1024, height=1024), replace(plot, x=AxisSpec(1, "1-20")), Bounds()
        )
    random_seed = plan_grid(replace(BASE, seed=-1), plot, Bounds(), choose_seed=lambda: 77)
    assert {c.request.seed for c in random_seed.cells} == {77, 79}  # fixed once, then varied


def test_lora_weight_cells_prepare_each_stack_once_and_match_alone(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    merging_calls: list[int] = []
    apply_paths, merge_layer = AdapterStack.apply_paths, AdapterStack._merge_layer
    merged: list[int] = [0]

    def counting_merge(self: AdapterStack, *args: object) -> None:
        merged[0] += 1
        merge_layer(self, *args)

    def counting_apply(self: AdapterStack, stack: list) -> list[str]:
        before = merged[0]
        warnings = apply_paths(self, stack)
        if merged[0] > before:
            merging_calls.append(len(stack))
        return warnings

    monkeypatch.setattr(AdapterStack, "_merge_layer", counting_merge)
    monkeypatch.setattr(AdapterStack, "apply_paths", counting_apply)
    base = replace(BASE, checkpoint="tiny-sd1")
    plot = XyzPlot(
        x=AxisSpec("LoRA weight", "ink: 0.2-1 [5]"),
        y=AxisSpec("Seed", "1-4"),
        include_lone_images=True,
    )
    output = run_xyz(service, base, plot, user="me")
    assert len(merging_calls) == 5  # 5 stacks, not 20: the LoRA axis is outermost
    assert output.grids == 1 and len(output.images) == 1 + 20
    lone = output.images[1:]  # in grid order: x fastest, then y
    monkeypatch.undo()
    alone = service.generate(lora_weight(replace(base, seed=3), "ink", 0.6))
    cell = np.asarray(lone[2 + 2 * 5], dtype=np.int16)  # x = 0.6, y = seed 3
    assert np.abs(cell - np.asarray(alone.images[0], dtype=np.int16)).max() <= 1
    assert "<lora:ink:0.6>" in output.infotexts[1 + 2 + 2 * 5]


def test_grid_geometry_legend_and_infotext(service: Service) -> None:
    base = replace(BASE, checkpoint="tiny-sd1")
    bare = XyzPlot(
        x=AxisSpec("Steps", "1,2"),
        y=AxisSpec("CFG Scale", "3,7"),
        draw_legend=False,
        include_lone_images=True,
    )
    plain = run_xyz(service, base, bare, user="me")
    grid = np.asarray(plain.images[0])
    assert plain.images[0].size == (128, 128)
    for index, (x, y) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)]):
        cell = grid[y * 64 : (y + 1) * 64, x * 64 : (x + 1) * 64]
        assert np.array_equal(cell, np.asarray(plain.images[1 + index]))
    params = parse_infotext(plain.infotexts[0]).params
    assert params["Script"] == "X/Y/Z plot"
    assert (params["X Type"], params["X Values"]) == ("Steps", "1,2")
    assert (params["Y Type"], params["Y Values"]) == ("CFG Scale", "3,7")
    assert parse_infotext(plain.infotexts[1]).params["Steps"] == "1"

    labelled = run_xyz(service, base, replace(bare, draw_legend=True, margin_size=4), user="me")
    legend = labelled.images[0]
    pad_left = 64 * 3 // 4
    assert legend.width == pad_left + 128 + 4 and legend.height > 128 + 4
    pad_top = legend.height - 128 - 4
    pixels = np.asarray(legend)
    # the cells sit under the labels, 4 px apart; the label areas are white with dark text
    assert np.array_equal(pixels[pad_top : pad_top + 64, pad_left : pad_left + 64], grid[:64, :64])
    top_right = pixels[pad_top : pad_top + 64, pad_left + 68 : pad_left + 132]
    assert np.array_equal(top_right, grid[:64, 64:])
    header = pixels[:pad_top, pad_left:]
    assert (header == 255).mean() > 0.8 and header.min() < 100


def test_page_values_make_the_same_grid_as_the_api_arguments() -> None:
    import asyncio

    import gradio as gr

    from frontends.page.xyz_panel import build_xyz_controls, xyz_plot_from_values

    async def build() -> dict[str, object]:
        with gr.Blocks():
            controls = build_xyz_controls("txt2img_")
        return {name: c.preprocess(c.value) for name, c in controls.items()}

    defaults = asyncio.run(build())
    assert (defaults["x_type"], defaults["y_type"], defaults["draw_legend"]) == (
        "Seed",
        "Nothing",
        True,
    )
    page = {**defaults, "x_type": "LoRA weight", "x_values": "ink: 0.2, 1"}
    page |= {"y_type": "Seed", "y_values": "1,2", "vary_seeds_x": True, "margin_size": 4.0}
    base = replace(BASE, subseed=9)  # no random choice in either plan
    from_page = plan_grid(base, xyz_plot_from_values(page), Bounds())
    args = [42, "ink: 0.2, 1", [], 1, "1,2", [], 0, "", [], True, False, False, False]
    api = xyz_from_script_args([*args, True, False, False, 4, False])
    from_api = plan_grid(base, api, Bounds())
    assert [c.request for c in from_page.cells] == [c.request for c in from_api.cells]
    assert from_page.plot.margin_size == from_api.plot.margin_size == 4


def test_an_interrupted_grid_keeps_its_cells_and_leaves_the_rest_black() -> None:
    from PIL import Image

    from pipelines.schema import GenerationResult
    from pipelines.xyz import assemble_grid

    plot = XyzPlot(x=AxisSpec("Steps", "1,2"), y=AxisSpec("Seed", "1,2"), draw_legend=False)
    plan = plan_grid(BASE, plot, Bounds())
    done = [
        GenerationResult(
            images=[Image.new("RGB", (64, 64), (200, 10 * i, 0))],
            seeds=[cell.request.seed],
            infotexts=[f"cell {i}\nSteps: 1, Version: lorastack 0.1.0"],
            request=cell.request,
            model_name="tiny",
            model_hash=None,
            interrupted=i == 2,
        )
        for i, cell in enumerate(plan.cells[:3])
    ]
    output = assemble_grid(plan, done)
    assert output.interrupted and output.grids == 1
    grid = np.asarray(output.images[0])
    corners = {(c.ix, c.iy): i for i, c in enumerate(plan.cells)}
    for (ix, iy), i in corners.items():
        pixel = tuple(grid[iy * 64 + 5, ix * 64 + 5])
        assert pixel == ((200, 10 * i, 0) if i < 3 else (0, 0, 0))
    text = output.infotexts[0]
    assert text.endswith(
        'Script: X/Y/Z plot, X Type: Steps, X Values: "1,2", Y Type: Seed, '
        'Y Values: "1,2", Fixed Y Values: "1, 2", Version: lorastack 0.1.0'
    )
