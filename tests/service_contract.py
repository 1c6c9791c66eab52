"""The contract every GenerationService implementation keeps (local engine, Ray).

Each check takes a ready service whose model folders hold the tiny SD1 (`tiny-sd1`) and the
LoRA `ink`, and a reference result maker; test modules run them against their service.
"""

from __future__ import annotations

import pickle
import threading
import time

import numpy as np
from PIL import Image

from pipelines.errors import InvalidRequestError, NotFoundError
from pipelines.interface import GenerationService, ProgressSnapshot
from pipelines.schema import ControlNetUnit, GenerationRequest, ImageInputs, LoraSpec
from pipelines.styles import PromptStyle

SMALL = {"width": 64, "height": 64, "steps": 2, "checkpoint": "tiny-sd1", "prompt": "a tower"}


def request(**fields: object) -> GenerationRequest:
    return GenerationRequest(**{**SMALL, **fields})  # type: ignore[arg-type]


def check_plain_data_crosses(service: GenerationService) -> None:
    """Every argument and answer pickles (a service may live in another process)."""
    snapshots: list[ProgressSnapshot] = []
    job = service.submit(request(seed=1), on_progress=snapshots.append, preview_every=1)
    result = service.result(job)
    answers = [
        service.device(),
        service.bounds(),
        service.memory(),
        result,
        service.progress(job, preview=True),
        service.progress(),
        service.jobs(),
        service.checkpoints(),
        service.loras(),
        service.resolve_checkpoint("tiny-sd1"),
        service.resolve_lora("ink"),
        service.current_model(),
        service.styles(),
        request(seed=1, loras=(LoraSpec("ink", 0.5),)),
        request(seed=1, refiner_checkpoint="tiny-sd1", refiner_switch_at=0.5),
        request(seed=1, controlnet=(ControlNetUnit(image=Image.new("RGB", (8, 8))),)),
        service.controlnet_models(),
        service.controlnet_modules(),
        service.controlnet_unavailable_modules(),
        *snapshots,
    ]
    for answer in answers:
        assert pickle.loads(pickle.dumps(answer)) is not None
    assert any(s.preview for s in snapshots), "no live preview was reported"
    assert {s.state for s in snapshots} >= {"running", "done"}


def check_same_request_same_pixels(service: GenerationService) -> None:
    stacked = request(seed=5, loras=(LoraSpec("ink", 0.7),))
    first, second = service.generate(stacked), service.generate(stacked)
    assert first.seeds == second.seeds == [5]
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(second.images[0]))
    assert first.infotexts == second.infotexts


def check_bad_requests_fail_before_queueing(service: GenerationService) -> None:
    before = len(service.jobs())
    for bad, error in (
        (request(steps=0), InvalidRequestError),
        (request(sampler_name="Bogus"), InvalidRequestError),
        (request(checkpoint="nope"), NotFoundError),
        (request(prompt="x <lora:nope:1>"), NotFoundError),
        (request(refiner_checkpoint="tiny-sd1", refiner_switch_at=2.0), InvalidRequestError),
        (request(refiner_checkpoint="nope"), NotFoundError),
    ):
        try:
            service.submit(bad)
        except error:
            continue
        raise AssertionError(f"{bad} was accepted")
    assert len(service.jobs()) == before


def check_interrupt_by_id_from_anywhere(service: GenerationService) -> None:
    """A job is stopped by its id alone: nothing of the submitter (a closed tab) is needed,
    and the other job in the queue is not touched."""
    steps: list[int] = []

    def slow(snapshot: ProgressSnapshot) -> None:
        if snapshot.state == "running" and snapshot.sampling_step:
            steps.append(snapshot.sampling_step)
            time.sleep(0.05)

    long = service.submit(request(seed=7, steps=8, n_iter=4), user="tab", on_progress=slow)
    other = service.submit(request(seed=8, n_iter=2), user="api")
    deadline = time.monotonic() + 60
    while service.progress(long).sampling_step < 2:
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.01)
    threading.Thread(target=service.interrupt, args=(long,)).start()
    stopped, finished = service.result(long, 120), service.result(other, 120)
    assert stopped.interrupted and len(stopped.images) < 4
    assert not finished.interrupted and len(finished.images) == 2


def inpainting_request(seed: int = 7) -> GenerationRequest:
    """Inpaint a 32x24 box of a seeded 96x64 noise image (blur 0: a sharp mask)."""
    rng = np.random.default_rng(seed)
    init = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    mask = Image.new("L", init.size, 0)
    mask.paste(255, (32, 20, 64, 44))
    inputs = ImageInputs(
        images=(init,), mask=mask, inpaint_full_res=False, mask_blur_x=0, mask_blur_y=0
    )
    return request(seed=seed, width=96, height=64, denoising_strength=0.8, img2img=inputs)


def check_img2img_same_pixels_and_kept_outside(service: GenerationService) -> None:
    """Images and masks cross the service; inpainting keeps the original outside."""
    wanted = inpainting_request()
    first, second = service.generate(wanted), service.generate(wanted)
    out = np.asarray(first.images[0])
    assert np.array_equal(out, np.asarray(second.images[0]))
    assert first.infotexts == second.infotexts
    assert wanted.img2img is not None and wanted.img2img.mask is not None
    outside = np.asarray(wanted.img2img.mask) == 0
    assert np.array_equal(out[outside], np.asarray(wanted.img2img.images[0])[outside])
    assert "Denoising strength: 0.8" in first.infotexts[0]


def check_extras_with_a_model_upscaler(service: GenerationService) -> None:
    """The folders also hold `2x_tiny` (tests.upscaler_files): Extras runs it as a job and
    gives the network's own pixels; a bad upscaler name fails before queueing."""
    import torch

    from pipelines.extras import ExtrasRequest
    from tests.upscaler_files import esrgan_forward, esrgan_state_dict

    assert "2x_tiny" in service.upscaler_names()
    pixels = np.random.default_rng(5).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    result = service.postprocess(ExtrasRequest((image, image), upscaler_1="2x_tiny"))
    tensor = torch.from_numpy(pixels.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    expected = esrgan_forward(esrgan_state_dict(scale=2), tensor)[0].permute(1, 2, 0).numpy()
    expected = np.round(expected * 255.0).astype(int)
    for out in result.images:
        assert out.size == (80, 48)
        assert np.abs(np.asarray(out).astype(int) - expected).max() <= 1
    assert result.infotexts[0].endswith("Postprocess upscaler: 2x_tiny")
    with_unknown = ExtrasRequest((image,), upscaler_1="4x-UltraSharp")
    try:
        service.postprocess(with_unknown)
    except InvalidRequestError as error:
        assert error.field == "upscaler_1"
    else:
        raise AssertionError("an unknown upscaler was accepted")
    assert service.jobs() == []


def check_styles_are_applied_before_queueing(service: GenerationService) -> None:
    """A request's styles are merged into its prompts by the service (A1111's rules), so a
    styled request makes the pixels and infotext of the same prompts typed out; an unknown
    style fails before queueing, naming the field."""
    frame = PromptStyle("contract-frame", "masterpiece, {prompt}", "{prompt}, lowres")
    assert service.save_style(frame).get(frame.name) == frame
    try:
        styled = service.generate(request(seed=3, negative_prompt="blurry", styles=(frame.name,)))
        typed = service.generate(
            request(seed=3, prompt="masterpiece, a tower", negative_prompt="blurry, lowres")
        )
        assert styled.request.prompt == "masterpiece, a tower"
        assert styled.request.negative_prompt == "blurry, lowres"
        assert styled.request.styles == (frame.name,)
        assert np.array_equal(np.asarray(styled.images[0]), np.asarray(typed.images[0]))
        assert styled.infotexts == typed.infotexts
        cells = service.series([request(seed=3, styles=(frame.name,))], label="styled cells")
        assert cells[0].request.prompt == "masterpiece, a tower"  # X/Y/Z cells are styled too
        before = len(service.jobs())
        try:
            service.submit(request(styles=("no-such-style",)))
        except InvalidRequestError as error:
            assert error.field == "styles" and frame.name in error.message
        else:
            raise AssertionError("an unknown style was accepted")
        assert len(service.jobs()) == before
    finally:
        assert frame.name not in service.delete_style(frame.name).names


def check_series_runs_in_order_and_stops_with_what_is_done(service: GenerationService) -> None:
    """A series is one job: every request is checked before any runs, each result equals
    the request run alone, progress counts all batches, and an interrupt keeps the done."""
    cells = [request(seed=seed, n_iter=n_iter) for seed, n_iter in ((3, 1), (4, 2), (5, 1))]
    before = len(service.jobs())
    try:
        service.submit_series([*cells, request(checkpoint="nope")], label="bad")
    except NotFoundError:
        pass
    else:
        raise AssertionError("a series with an unknown checkpoint was accepted")
    assert len(service.jobs()) == before
    snapshots: list[ProgressSnapshot] = []
    results = service.series(cells, label="grid", on_progress=snapshots.append)
    assert [r.seeds for r in results] == [[3], [4, 5], [5]]
    alone = service.generate(cells[1])
    assert all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(results[1].images, alone.images, strict=True)
    )
    assert {(s.job_no, s.job_count) for s in snapshots if s.state == "running"} >= {
        (0, 4),
        (3, 4),
    }

    long = [cells[0], request(seed=4, steps=8, n_iter=3), cells[2]]
    asked: list[bool] = []

    def stop_in_the_second(snapshot: ProgressSnapshot) -> None:
        if snapshot.state != "running" or not snapshot.sampling_step:
            return
        time.sleep(0.05)  # slow steps: a remote replica sees the interrupt in time
        if snapshot.job_no >= 1 and snapshot.sampling_step >= 2 and not asked:
            asked.append(True)
            threading.Thread(target=service.interrupt, args=(snapshot.job_id,)).start()

    job = service.submit_series(long, label="grid", on_progress=stop_in_the_second)
    stopped = service.series_result(job, 120)
    assert len(stopped) == 2 and stopped[1].interrupted and len(stopped[1].images) < 3
    assert np.array_equal(np.asarray(stopped[0].images[0]), np.asarray(results[0].images[0]))
