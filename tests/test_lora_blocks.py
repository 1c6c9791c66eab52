"""Block weights and per-step weight schedules: the tag grammar, the exact merge, the
per-step re-merge, and whole runs against hand-built ones.

Oracles are independent of pipelines.lora: block ids of the tiny SD1's layers are written
out by hand below, deltas come from `tests.test_lora.oracle_lora`, and schedules are
checked against weights computed by hand.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipelines.errors import InvalidRequestError
from pipelines.infotext import parse_infotext
from pipelines.loading import LoadedModel, random_pipeline
from pipelines.lora.stack import AdapterStack, StackEntry
from pipelines.lora.weights import PRESETS, BlockWeights, WeightSchedule
from pipelines.prompt import extract_lora_tags, format_lora_tag
from pipelines.schema import Bounds, GenerationRequest, HiresFix, LoraSpec
from pipelines.service import Service, build_service
from pipelines.settings import Settings
from tests.conftest import DEMO_YAML
from tests.test_lora import (
    SD1_MODULES,
    assert_bit_exact,
    assert_matches,
    make_kohya,
    oracle,
    oracle_lora,
    sd1_keys,
    snapshot,
    write,
)

# ----------------------------------------------------------------------------- grammar


def one(tag: str) -> LoraSpec:
    text, specs = extract_lora_tags(f"a tower {tag}")
    assert text == "a tower "
    assert len(specs) == 1
    return specs[0]


@pytest.mark.parametrize(
    ("tag", "expected"),
    [
        ("<lora:ink:0.8>", LoraSpec("ink", 0.8)),
        (
            "<lora:ink:0.7:in=0.5:mid=1:out=0.8>",
            LoraSpec("ink", 0.7, blocks=BlockWeights(0.5, 1.0, 0.8)),
        ),
        ("<lora:ink:1:out=0>", LoraSpec("ink", 1.0, blocks=BlockWeights(up=0.0))),
        ("<lora:ink:0.7:lbw=INALL>", LoraSpec("ink", 0.7, blocks=BlockWeights(lbw="INALL"))),
        (
            "<lora:ink:lbw=1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1>",
            LoraSpec("ink", 1.0, blocks=BlockWeights(lbw=(1.0,) + (0.0,) * 7 + (1.0,) * 9)),
        ),
        (
            "<lora:ink:0@0,1@0.5>",
            LoraSpec("ink", WeightSchedule(((0.0, 0.0), (1.0, 0.5)))),
        ),
        (  # loractl: sorted by position; a keyframe without @ sits at 1; ';' separates too
            "<lora:ink:0.5;1@0>",
            LoraSpec("ink", WeightSchedule(((1.0, 0.0), (0.5, 1.0)))),
        ),
        (
            "<lora:ink:te=0.5:unet=0@0,1@1:hr=0.25>",
            LoraSpec("ink", WeightSchedule(((0.0, 0.0), (1.0, 1.0))), 0.5, None, 0.25, 0.25),
        ),
        (
            "<lora:ink:1:hr=2:hrte=0.5>",
            LoraSpec("ink", 1.0, hr_weight=2.0, hr_te_weight=0.5),
        ),
    ],
)
def test_tag_forms_read_and_write_back(tag: str, expected: LoraSpec) -> None:
    spec = one(tag)
    assert spec == expected
    assert one(format_lora_tag(spec)) == spec  # the infotext's tag reads back the same


@pytest.mark.parametrize(
    ("tag", "words"),
    [
        ("<lora:ink:1:in=0.5:lbw=ALL>", "in= and lbw="),
        ("<lora:ink:1:mid=0:out=1:lbw=ALL>", "mid/out= and lbw="),
        ("<lora:ink:1:lbw=NOPE>", "unknown lbw preset 'NOPE'"),
        ("<lora:ink:1:lbw=1,1,1>", "lbw= has 3 values"),
        ("<lora:ink:1:lbw=R,1,1,1,1,1,1,1,1,1,1,1>", "'R' is not a number"),
        ("<lora:ink:1:INALL>", "written lbw=INALL"),
        ("<lora:ink:1@0.5,0@0.5>", "two keyframes at one position"),
        ("<lora:ink:1@-1,0@1>", "before position 0"),
        ("<lora:ink:x@0,1@1>", "'x'"),
        ("<lora:ink:1:in=0@0,1@1>", "in= takes a number"),
        ("<lora:ink:1:start=4>", "start= is not supported"),
        ("<lora:ink:1:lbwe=ATTNDEEPON>", "lbwe= is not supported"),
    ],
)
def test_bad_forms_are_refused_naming_the_field(tag: str, words: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        extract_lora_tags(f"a tower {tag}")
    assert caught.value.field == "prompt"
    assert words in caught.value.message and tag in caught.value.message


def test_typed_fields_are_validated_like_tags() -> None:
    def check(spec: LoraSpec) -> str:
        with pytest.raises(InvalidRequestError) as caught:
            GenerationRequest(loras=(spec,)).validated(Bounds())
        assert caught.value.field is not None and "loras[0]" in caught.value.field
        return caught.value.message

    assert "in/mid/out and lbw=" in check(LoraSpec("ink", blocks=BlockWeights(down=0.5, lbw="ALL")))
    assert "unknown lbw preset" in check(LoraSpec("ink", blocks=BlockWeights(lbw="NOPE")))
    assert "must rise" in check(LoraSpec("ink", WeightSchedule(((0.0, 0.5), (1.0, 0.5)))))
    assert "between -10 and 10" in check(LoraSpec("ink", 1.0, hr_weight=1e9))


def test_schedule_weights_per_step_by_hand() -> None:
    ramp = WeightSchedule(((0.0, 0.0), (1.0, 1.0)))
    assert [ramp.at(i, 4) for i in range(4)] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    half = WeightSchedule(((0.0, 0.0), (1.0, 0.5)))
    assert [half.at(i, 5) for i in range(5)] == pytest.approx([0, 0.5, 1, 1, 1])
    # absolute positions are step numbers from 1: off for two steps, on from the third
    switch = WeightSchedule(((0.0, 2.0), (1.0, 3.0)))
    assert [switch.at(i, 4) for i in range(4)] == [0, 0, 1, 1]
    assert WeightSchedule(((0.4, 0.0), (0.4, 1.0))).constant
    assert extract_lora_tags("<lora:ink:0@0,1@1> <lora:ink:1>")[1][0].weight == 2.0
    twice = extract_lora_tags("<lora:ink:1> <lora:ink:0@0,1@1>")[1][0]
    assert twice.weight == WeightSchedule(((0.0, 0.0), (2.0, 1.0)))


def test_presets_are_the_extensions_tables() -> None:
    """Spot checks against lora-block-weight's DEF_WEIGHT_PRESET and Inspire's SDXL-*."""
    assert PRESETS[17]["INALL"] == (1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    assert PRESETS[17]["OUTALL"] == (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1)
    assert PRESETS[17]["MIDD"] == (1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0)
    assert PRESETS[12]["OUTALL"] == (1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1)


# ----------------------------------------------------------------------------- merge

# The tiny SD1 (one res block per level, two levels) in LDM numbering, by hand:
# input_blocks 1 = down_blocks.0, 2 = its downsampler, 3 = down_blocks.1;
# output_blocks 0-1 = up_blocks.0, 2-3 = up_blocks.1.
BLOCK_OF = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "IN01",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": "IN03",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.2": "M00",
    "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_out.0": "OUT03",
    "down_blocks.1.resnets.0.time_emb_proj": "IN03",
    "down_blocks.0.resnets.0.conv1": "IN01",
    "down_blocks.1.attentions.0.proj_in": "IN03",
    "up_blocks.0.resnets.0.conv2": "OUT00",
}
REGION_OF = {name: {"IN": "in", "M0": "mid", "OU": "out"}[b[:2]] for name, b in BLOCK_OF.items()}
IDS26 = ["BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12))]


@pytest.fixture(scope="module")
def sd1(cache_root: Path) -> LoadedModel:
    return random_pipeline(DEMO_YAML, 0, cache_root)


@pytest.fixture(scope="module")
def ink(sd1: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    keys = sd1_keys(SD1_MODULES)
    state = make_kohya(sd1.pipe, SD1_MODULES, keys, seed=5)
    return write(tmp_path_factory.mktemp("blocks") / "ink.safetensors", state), state


def expected_weights(base: Any, state: dict, w: float, te: float, ratio: Any) -> Any:
    """base + Σ ratio(layer) · weight · delta, every delta by the kohya formula."""
    keys = sd1_keys(SD1_MODULES)
    deltas = []
    for component, name, _ in SD1_MODULES:
        weight = te if component != "unet" else w
        factor = ratio(component, name) * weight
        deltas.append(
            (
                (component, name),
                oracle_lora(base[(component, name)], state, keys[(component, name)], factor),
            )
        )
    return oracle(base, deltas)


def test_block_weights_merge_exactly(sd1: LoadedModel, ink: tuple[Path, dict]) -> None:
    pipe, (path, state) = sd1.pipe, ink
    base = snapshot(pipe)
    stack = AdapterStack(pipe, sd1.architecture)

    def merged(blocks: BlockWeights | None, w: float = 0.8, te: float = 0.6) -> Any:
        stack.apply_paths([StackEntry(path, "ink", w, te, blocks)])
        return snapshot(pipe)

    plain = merged(None)
    # in=1:mid=1:out=1 is the plain LoRA, bit for bit
    assert all(torch.equal(v, plain[k]) for k, v in merged(BlockWeights(1, 1, 1)).items())
    # zeros with te=0: no LoRA at all, bit for bit
    merged(BlockWeights(0, 0, 0), te=0.0)
    assert_bit_exact(pipe, base)
    # out only: the up layers are the plain LoRA's, every other layer the base
    out_only = merged(BlockWeights(0, 0, 1), te=0.0)
    for component, name, _ in SD1_MODULES:
        want = plain if component == "unet" and REGION_OF[name] == "out" else base
        assert torch.equal(out_only[(component, name)], want[(component, name)]), name
    # in/mid/out against the independent computation
    merged(BlockWeights(0.25, -1.5, 2.0))
    values = {"in": 0.25, "mid": -1.5, "out": 2.0}

    def region_ratio(component: str, name: str) -> float:
        return 1.0 if component != "unet" else values[REGION_OF[name]]

    assert_matches(pipe, expected_weights(base, state, 0.8, 0.6, region_ratio))
    # 26 distinct lbw values: each layer takes its block's, BASE scales the text encoder
    lbw = tuple(round(0.1 * (i + 1) - 1.2, 2) for i in range(26))
    merged(BlockWeights(lbw=lbw))

    def lbw_ratio(component: str, name: str) -> float:
        block = "BASE" if component != "unet" else BLOCK_OF[name]
        return lbw[IDS26.index(block)]

    assert_matches(pipe, expected_weights(base, state, 0.8, 0.6, lbw_ratio))
    # a preset is the same weights written out; 17 values leave IN03 and OUT00 at 0
    by_name = merged(BlockWeights(lbw="OUTALL"))
    written = merged(BlockWeights(lbw=PRESETS[17]["OUTALL"]))
    assert all(torch.equal(v, by_name[k]) for k, v in written.items())
    for component, name, _ in SD1_MODULES:
        if component == "unet" and BLOCK_OF[name] in ("IN01", "IN03", "M00", "OUT00"):
            assert torch.equal(written[(component, name)], base[(component, name)]), name
    stack.apply_paths([])
    assert_bit_exact(pipe, base)


XL_BLOCK_OF = {  # the tiny SDXL: two levels, one res block each, attention on the second
    "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k": "IN03",
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_q": "M00",
    "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.2": "OUT01",
    "up_blocks.1.resnets.1.conv1": "OUT03",
}


def test_sdxl_lbw_layouts_and_base_on_both_text_encoders(cache_root: Path, tmp_path: Path) -> None:
    from tests.conftest import SDXL_YAML

    loaded = random_pipeline(SDXL_YAML, 0, cache_root)
    pipe = loaded.pipe
    modules = [("unet", name, "conv3" if "conv" in name else "linear") for name in XL_BLOCK_OF]
    modules += [
        ("text_encoder", "encoder.layers.0.self_attn.q_proj", "linear"),
        ("text_encoder_2", "text_model.encoder.layers.0.self_attn.q_proj", "linear"),
    ]
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_text_model_"}
    keys = {(c, n): prefixes.get(c, "lora_te2_") + n.replace(".", "_") for c, n, _ in modules}
    state = make_kohya(pipe, modules, keys, seed=8)
    path = write(tmp_path / "xl.safetensors", state)
    base = snapshot(pipe)
    stack = AdapterStack(pipe, loaded.architecture)
    ids20 = ["BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9))]
    lbw = tuple(round(0.1 * (i + 1), 2) for i in range(20))
    for values, ids in ((lbw, ids20), (PRESETS[12]["OUTALL"], None)):
        stack.apply_paths([StackEntry(path, "xl", 0.9, 0.7, BlockWeights(lbw=values))])

        def ratio(component: str, name: str, values: Any = values, ids: Any = ids) -> float:
            block = "BASE" if component != "unet" else XL_BLOCK_OF[name]
            if ids is None:  # the 12-block layout: IN03 and OUT03 are not in it
                twelve = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00"]
                twelve += [f"OUT{i:02d}" for i in range(6)]
                return values[twelve.index(block)] if block in twelve else 0.0
            return values[ids.index(block)]

        deltas = [
            (
                (c, n),
                oracle_lora(
                    base[(c, n)], state, keys[(c, n)], ratio(c, n) * (0.7 if c != "unet" else 0.9)
                ),
            )
            for c, n, _ in modules
        ]
        assert_matches(pipe, oracle(base, deltas))
    with pytest.raises(InvalidRequestError, match="takes 12 or 20"):
        stack.apply_paths([StackEntry(path, "xl", 1.0, 1.0, BlockWeights(lbw=(1.0,) * 17))])
    stack.apply_paths([])
    assert_bit_exact(pipe, base)


def test_block_weights_that_do_not_fit_the_family(sd1: LoadedModel, ink: tuple[Path, dict]):
    stack = AdapterStack(sd1.pipe, sd1.architecture)
    base = snapshot(sd1.pipe)
    for blocks, words in (
        (BlockWeights(lbw="MIDALL"), "no SD1 layout"),
        (BlockWeights(lbw=(1.0,) * 12), "takes 17 or 26"),
    ):
        with pytest.raises(InvalidRequestError, match=words):
            stack.apply_paths([StackEntry(ink[0], "ink", 1.0, 1.0, blocks)])
        assert_bit_exact(sd1.pipe, base)  # refused before any weight changed


def test_reweight_merges_only_the_scheduled_loras_layers(
    sd1: LoadedModel, ink: tuple[Path, dict], tmp_path: Path
) -> None:
    pipe, (path, _) = sd1.pipe, ink
    base = snapshot(pipe)
    keys = sd1_keys(SD1_MODULES)
    other = write(tmp_path / "o.safetensors", make_kohya(pipe, SD1_MODULES[:3], keys, seed=6))
    stack = AdapterStack(pipe, sd1.architecture)
    stack.apply_paths(
        [StackEntry(other, "o", 0.5, 0.5), StackEntry(path, "ink", 0.0, 0.3, scheduled=True)]
    )
    assert stack.reweight({1: (0.0, 0.3)}) == 0  # nothing changed: nothing merged
    unet_layers = sum(1 for c, _, _ in SD1_MODULES if c == "unet")
    assert stack.reweight({1: (0.9, 0.3)}) == unet_layers  # the UNet part only, once each
    by_step = snapshot(pipe)
    stack.apply_paths([StackEntry(other, "o", 0.5, 0.5), StackEntry(path, "ink", 0.9, 0.3)])
    assert all(torch.equal(v, by_step[k]) for k, v in snapshot(pipe).items())
    stack.reweight({1: (0.0, 0.0)})
    stack.apply_paths([])
    assert_bit_exact(pipe, base)


# ----------------------------------------------------------------------------- runs

SMALL = {"width": 64, "height": 64, "steps": 4, "checkpoint": "tiny-sd1", "seed": 3}


@pytest.fixture(scope="module")
def engine(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, tiny_sd1: LoadedModel
) -> Service:
    data = tmp_path_factory.mktemp("data")
    keys = sd1_keys(SD1_MODULES)
    write(data / "loras" / "ink.safetensors", make_kohya(tiny_sd1.pipe, SD1_MODULES, keys, seed=7))
    settings = Settings(
        data_dir=data, ckpt_dirs=(models_dir,), lora_dirs=(data / "loras",), threads=2
    )
    service = build_service(settings)
    service.folders.hash_missing()
    return service


def pixels(engine: Service, prompt: str, **fields: object) -> np.ndarray:
    request = GenerationRequest(prompt=f"a tower {prompt}", **{**SMALL, **fields})
    return np.asarray(engine.generate(request).images[0])


class Switcher:
    """A run control that applies hand-picked weights to the stack after given steps:
    the hand-built run a schedule must equal."""

    def __init__(self, engine: Service, after: dict[int, tuple[float, float]]) -> None:
        self.engine, self.after = engine, after
        self.interrupted = self.skipped = False

    def batch(self, job_no: int, job_count: int, steps: int) -> None:
        pass

    def batch_finished(self, result: object) -> None:
        pass

    def step(self, step: int, preview: object = None) -> None:
        if step in self.after:
            unet, te = self.after[step]
            path = self.engine.resolve_lora("ink").path
            model = self.engine.runner.manager.current  # type: ignore[attr-defined]
            model.adapters.apply_paths([(path, "ink", unet, te)])


def hand_built(
    engine: Service, prompt: str, after: dict[int, tuple[float, float]], **fields: object
) -> np.ndarray:
    request = GenerationRequest(prompt=f"a tower {prompt}", **{**SMALL, **fields})
    request = request.validated(Bounds())
    request = replace(request, checkpoint=engine.resolve_checkpoint("tiny-sd1").key)
    result = engine.runner.generate(request, Switcher(engine, after))  # type: ignore[arg-type]
    return np.asarray(result.images[0])


def test_block_weight_runs(engine: Service) -> None:
    base = pixels(engine, "")
    plain = pixels(engine, "<lora:ink:0.8>")
    assert not np.array_equal(plain, base)
    assert np.array_equal(pixels(engine, "<lora:ink:0.8:in=1:mid=1:out=1>"), plain)
    assert np.array_equal(pixels(engine, "<lora:ink:0.8:in=0:mid=0:out=0:te=0>"), base)
    out_only = pixels(engine, "<lora:ink:0.8:in=0:mid=0:out=1>")
    assert not np.array_equal(out_only, base) and not np.array_equal(out_only, plain)
    assert np.array_equal(
        pixels(engine, "<lora:ink:0.8:lbw=OUTALL>"),
        pixels(engine, "<lora:ink:0.8:lbw=1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1>"),
    )


def test_two_keyframe_schedule_equals_a_switch_at_that_step(engine: Service) -> None:
    # te 0.5 throughout; the UNet weight is 0 for steps 1-2 and 1 from step 3 (1-based)
    scheduled = pixels(engine, "<lora:ink:te=0.5:unet=0@2,1@3>")
    switched = hand_built(engine, "<lora:ink:0.5:0>", {2: (1.0, 0.5)})
    assert np.array_equal(scheduled, switched)
    assert not np.array_equal(scheduled, pixels(engine, "<lora:ink:0.5:0>"))
    assert not np.array_equal(scheduled, pixels(engine, "<lora:ink:0.5:1>"))


def test_ramp_equals_hand_built_per_step_weights(engine: Service) -> None:
    scheduled = pixels(engine, "<lora:ink:te=0.5:unet=0@0,1@1>")
    # 4 steps at positions 0, 1/3, 2/3, 1: set after step k for step k+1
    ramp = {1: (1 / 3, 0.5), 2: (2 / 3, 0.5), 3: (1.0, 0.5)}
    assert np.array_equal(scheduled, hand_built(engine, "<lora:ink:0.5:0>", ramp))


def test_second_order_sampler_keeps_one_weight_per_step(engine: Service) -> None:
    """Heun evaluates the UNet twice per step after the first (7 evaluations for 4
    steps); both evaluations of a step use that step's weight."""
    scheduled = pixels(engine, "<lora:ink:te=0.5:unet=0@0,1@1>", sampler_name="Heun")
    ramp = {1: (1 / 3, 0.5), 3: (2 / 3, 0.5), 5: (1.0, 0.5)}  # after evaluations 1, 3, 5
    assert np.array_equal(
        scheduled, hand_built(engine, "<lora:ink:0.5:0>", ramp, sampler_name="Heun")
    )


def test_img2img_ramp_runs_over_the_steps_it_denoises(engine: Service) -> None:
    from PIL import Image

    from pipelines.schema import ImageInputs

    image = Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3))
    fields = {"img2img": ImageInputs(images=(image,)), "denoising_strength": 0.75}
    # strength 0.75 of 4 steps denoises 4 steps (A1111's t_enc + 1): 0, 1/3, 2/3, 1
    scheduled = pixels(engine, "<lora:ink:te=0.5:unet=0@0,1@1>", **fields)
    ramp = {1: (1 / 3, 0.5), 2: (2 / 3, 0.5), 3: (1.0, 0.5)}
    assert np.array_equal(scheduled, hand_built(engine, "<lora:ink:0.5:0>", ramp, **fields))


def test_constant_schedule_is_the_plain_weight_and_base_comes_back(engine: Service) -> None:
    pixels(engine, "")
    model = engine.runner.manager.current  # type: ignore[attr-defined]
    base = snapshot(model.pipe)
    assert np.array_equal(
        pixels(engine, "<lora:ink:0.7@0,0.7@1>"), pixels(engine, "<lora:ink:0.7>")
    )
    for tag in ("<lora:ink:0@0,1@1>", "<lora:ink:te=0@0,1@1:unet=1@0,0@1>", "<lora:ink:1@2,0@3>"):
        pixels(engine, tag, n_iter=2)
        pixels(engine, "")
        assert_bit_exact(model.pipe, base)


def test_text_encoder_schedule_reencodes_per_state(engine: Service) -> None:
    ramp = pixels(engine, "<lora:ink:te=0@0,1@1:unet=1>")
    assert not np.array_equal(ramp, pixels(engine, "<lora:ink:0:1>"))
    assert not np.array_equal(ramp, pixels(engine, "<lora:ink:1:1>"))
    # a constant te schedule is the constant weight
    assert np.array_equal(
        pixels(engine, "<lora:ink:te=1@0,1@1:unet=1>"), pixels(engine, "<lora:ink:1:1>")
    )


def test_hires_weights_are_the_second_pass_stack(engine: Service) -> None:
    hires = HiresFix(scale=1.5, upscaler="Latent", second_pass_steps=2)
    by_hr = pixels(engine, "<lora:ink:0:hr=0.8>", hires=hires, denoising_strength=0.6)
    by_prompt = pixels(
        engine,
        "",
        hires=HiresFix(
            scale=1.5, upscaler="Latent", second_pass_steps=2, prompt="a tower <lora:ink:0.8>"
        ),
        denoising_strength=0.6,
    )
    assert np.array_equal(by_hr, by_prompt)


def test_infotext_writes_every_form_and_replays(engine: Service) -> None:
    rows = (
        LoraSpec("ink", WeightSchedule(((0.0, 0.0), (1.0, 1.0))), 0.5, BlockWeights(lbw="OUTALL")),
    )
    result = engine.generate(GenerationRequest(prompt="a tower", loras=rows, **SMALL))
    parsed = parse_infotext(result.infotexts[0])
    assert parsed.prompt == "a tower <lora:ink:0.5:0@0,1@1:lbw=OUTALL>"
    replay = engine.generate(GenerationRequest(prompt=parsed.prompt, **SMALL))
    assert np.array_equal(np.asarray(replay.images[0]), np.asarray(result.images[0]))


def test_front_ends_keep_every_form(engine: Service) -> None:
    """Stack rows hold a name and two numbers: tags saying more stay in the prompt when
    the page moves tags to the stack or recalls an infotext; the CLI takes every form."""
    from frontends.cli.__main__ import parse_lora
    from frontends.page.recall import recall
    from frontends.page.stack import (
        NO_PRESET,
        blocks_value,
        move_tags_to_stack,
        rows_from_value,
        specs_from_rows,
    )

    prompt, rows = move_tags_to_stack(
        "a <lora:ink:0.8> b <lora:glow:1:lbw=ALL> <lora:soft:0@0,1@1:in=0>", []
    )
    assert prompt == "a b <lora:soft:0@0,1@1:in=0>"
    assert rows == [
        {"name": "ink", "weight": 0.8, "te_weight": None},
        {"name": "glow", "weight": 1.0, "te_weight": None, "blocks": {"lbw": "ALL"}},
    ]
    assert specs_from_rows(rows_from_value(json.dumps(rows)))[1] == LoraSpec(
        "glow", 1.0, blocks=BlockWeights(lbw="ALL")
    )
    assert blocks_value(1, 1, 1, NO_PRESET) is None
    assert blocks_value(0, 1, 0.5, NO_PRESET) == {"in": 0, "mid": 1, "out": 0.5}
    assert blocks_value(0, 1, 0.5, "INALL") == {"lbw": "INALL"}
    with pytest.raises(InvalidRequestError, match="in/mid/out and lbw"):
        rows_from_value([{"name": "ink", "blocks": {"in": 0, "lbw": "ALL"}}])
    recalled = recall("a tower <lora:ink:0@0,1@1>\nSteps: 4, Seed: 3, Size: 64x64", engine)
    assert recalled.values["prompt"] == "a tower <lora:ink:0@0,1@1>"
    assert parse_lora("ink:0.5:lbw=INALL") == LoraSpec("ink", 0.5, blocks=BlockWeights(lbw="INALL"))
    assert parse_lora("ink:0@0,1@1").weight == WeightSchedule(((0.0, 0.0), (1.0, 1.0)))
