"""The Gradio page: a thin client of the engine that only builds GenerationRequests."""

from __future__ import annotations

from typing import Any

import gradio as gr

from pipelines.errors import LorastackError
from pipelines.infotext import write_png_with_infotext
from pipelines.output import save_png
from pipelines.samplers import SAMPLER_NAMES, SCHEDULER_LABELS
from pipelines.schema import GenerationRequest, field_spec


def build_ui(engine: Any) -> Any:
    """The txt2img page: every control is built from pipelines.schema's field specs."""

    def number(name: str, component: type = gr.Slider) -> Any:
        spec = field_spec(name, engine.bounds)
        if component is gr.Slider:
            return gr.Slider(
                spec.minimum, spec.maximum, value=spec.default, step=spec.step, label=spec.label
            )
        return gr.Number(value=spec.default, label=spec.label, precision=0)

    def checkpoint_choices() -> list[str]:
        titles = [e.title for e in engine.checkpoints.entries() if not e.error]
        current = engine.current_title()
        if current and current not in titles:
            titles.insert(0, current)
        return titles

    def generate(
        prompt: str,
        negative: str,
        steps: float,
        cfg: float,
        seed: float,
        width: float,
        height: float,
        batch_size: float,
        n_iter: float,
        sampler: str,
        scheduler: str,
        clip_skip: float,
        checkpoint: str | None,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio injects it
    ) -> tuple[list, str]:
        demo = checkpoint == engine.current_title() and engine.model and not engine.model.entry
        request = GenerationRequest(
            prompt=prompt,
            negative_prompt=negative,
            steps=int(steps),
            cfg_scale=float(cfg),
            seed=int(seed),
            width=int(width),
            height=int(height),
            batch_size=int(batch_size),
            n_iter=int(n_iter),
            sampler_name=sampler,
            scheduler=scheduler,
            clip_skip=int(clip_skip),
            checkpoint=None if (not checkpoint or demo) else checkpoint,
        )

        def on_step(state: Any) -> None:
            progress(state.fraction, desc=f"step {state.sampling_step}/{state.sampling_steps}")

        try:
            result = engine.generate(request, on_step=on_step)
        except LorastackError as error:
            raise gr.Error(error.message) from error
        gallery = []
        for image, seed_used, infotext in zip(
            result.images, result.seeds, result.infotexts, strict=True
        ):
            png = write_png_with_infotext(image, infotext)
            path = save_png(engine.settings.outputs_dir, png, seed_used)
            gallery.append((str(path), f"seed {seed_used}"))
        text = result.infotexts[0] if result.infotexts else ""
        if result.notes:
            text += "\n\n" + "\n".join(result.notes)
        return gallery, text

    with gr.Blocks(title="lorastack") as page:
        gr.Markdown("# lorastack")
        if engine.model is not None and engine.model.entry is None:
            gr.Markdown(
                "**Demo model:** no checkpoint was found, so the built-in tiny model with "
                "random weights is running; its images are noise. Put a Stable Diffusion "
                "checkpoint into `models/` and refresh."
            )
        with gr.Row():
            checkpoint = gr.Dropdown(
                checkpoint_choices(),
                value=engine.current_title(),
                label="Stable Diffusion checkpoint",
                scale=4,
            )
            refresh = gr.Button("Refresh", scale=1)
        prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt")
        negative = gr.Textbox(label="Negative prompt", lines=2, elem_id="negative_prompt")
        with gr.Row():
            sampler = gr.Dropdown(list(SAMPLER_NAMES), value="DPM++ 2M", label="Sampling method")
            scheduler = gr.Dropdown(
                list(SCHEDULER_LABELS), value=SCHEDULER_LABELS[0], label="Schedule type"
            )
            steps = number("steps")
        with gr.Row():
            width, height = number("width"), number("height")
            batch_count, batch_size = number("n_iter"), number("batch_size")
        with gr.Row():
            cfg = number("cfg_scale")
            seed = number("seed", gr.Number)
            clip_skip = number("clip_skip")
        with gr.Row():
            run = gr.Button("Generate", variant="primary", elem_id="generate")
            stop = gr.Button("Interrupt", elem_id="interrupt")
        gallery = gr.Gallery(label="Images", elem_id="gallery", columns=4)
        info = gr.Textbox(label="Parameters", lines=4, elem_id="infotext")

        inputs = [
            prompt,
            negative,
            steps,
            cfg,
            seed,
            width,
            height,
            batch_size,
            batch_count,
            sampler,
            scheduler,
            clip_skip,
            checkpoint,
        ]
        run.click(generate, inputs, [gallery, info], api_name="txt2img")
        stop.click(engine.interrupt, None, None, api_name=False)

        def do_refresh() -> Any:
            engine.rescan()
            return gr.Dropdown(choices=checkpoint_choices())

        refresh.click(do_refresh, None, checkpoint, api_name=False)
    return page
