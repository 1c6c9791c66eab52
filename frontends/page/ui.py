"""The Gradio page: a thin client of the generation service that builds GenerationRequests.

Layout: txt2img (prompt, parameters, LoRA stack, results, LoRA list), PNG Info, Add files,
Settings. Per-user choices (checkpoint, stack, fields, the running job's id) are component
values or `gr.State`, so each browser session has its own; jobs, their order and the
per-user limits belong to the service (shared with the API and the CLI).
"""

from __future__ import annotations

import inspect
import queue
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import gradio as gr

from deployments.ingest import IngestPolicy
from frontends.page.defaults import load_defaults, scheduler_label
from frontends.page.files_tab import build_files_tab
from frontends.page.lora_panel import QUICK, build_library, build_stack
from frontends.page.stack import rows_from_value, specs_from_rows
from frontends.page.tabs import admin_refusal, build_pnginfo, build_settings
from pipelines.errors import LorastackError
from pipelines.infotext import write_png_with_infotext
from pipelines.interface import (
    DEMO_MODEL_NAME,
    GenerationService,
    ProgressSnapshot,
)
from pipelines.limits import user_key
from pipelines.output import save_png
from pipelines.samplers import SAMPLER_NAMES, SCHEDULER_LABELS
from pipelines.schema import (
    RANDN_SOURCES,
    GenerationRequest,
    GenerationResult,
    field_spec,
    request_from_dict,
)
from pipelines.settings import Settings

PREVIEW_EVERY = 3
"""Steps between two live previews."""
FINAL_STATES = ("done", "failed", "cancelled")

API_FIELDS = (
    "prompt",
    "negative_prompt",
    "steps",
    "cfg_scale",
    "sampler_name",
    "scheduler",
    "seed",
    "width",
    "height",
    "batch_size",
    "n_iter",
    "clip_skip",
)
"""The `/txt2img` endpoint's request parameters, in order (schema.FIELDS names), followed by
`checkpoint`, `loras` and `EXTRA_FIELDS`."""

EXTRA_FIELDS = (
    "subseed",
    "subseed_strength",
    "seed_resize_from_w",
    "seed_resize_from_h",
    "tiling",
    "randn_source",
)
"""A1111's "Extra" seed row and tiling: after `loras`, so positional API callers of the
first version keep working."""

PAGE_JS = """
const style = document.createElement('style');
style.textContent = `
  .lora-cards { flex-wrap: wrap !important; gap: 8px; }
  .lora-card { border: 1px solid var(--border-color-primary); border-radius: 8px;
               padding: 6px; max-width: 220px; }
  .lora-incompatible { opacity: 0.45; }
  .lora-thumb { width: 100%; max-height: 128px; object-fit: cover; border-radius: 4px; }
  .lora-nothumb { height: 48px; display: flex; align-items: center; justify-content: center;
                  color: var(--body-text-color-subdued); font-size: 12px; }
  .lora-name { font-weight: 600; word-break: break-all; }
  .lora-facts, .lora-alias, .lora-words { font-size: 12px; }
  .lora-why { font-size: 12px; color: var(--color-accent); }
`;
document.head.appendChild(style);
document.addEventListener('keydown', (event) => {
  const inPrompt = event.target && event.target.closest &&
    event.target.closest('#prompt, #negative_prompt');
  if (inPrompt && event.key === 'Enter' && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    document.querySelector('#generate')?.click();
  }
});
"""
"""Page styling, and Ctrl+Enter in a prompt box generates (as in A1111)."""


def build_ui(
    service: GenerationService,
    settings: Settings,
    *,
    preview_every: int = PREVIEW_EVERY,
    refresh_seconds: float = 5.0,
    policy: IngestPolicy | None = None,
    env: Mapping[str, str] | None = None,
) -> gr.Blocks:
    """The whole page. Events that only touch the page run outside Gradio's queue; the
    generation event is not limited by Gradio either: the service's job queue decides the
    order of every front end's jobs.

    Args:
        service: the generation service.
        settings: launch settings (outputs folder, hidden paths, data folder).
        preview_every: steps between live previews.
        refresh_seconds: how often the LoRA list checks the folders.
        policy: the rules for the Add files tab (default: from the settings).
        env: the environment (os.environ by default): Space storage.
    """
    policy = policy or IngestPolicy.from_settings(settings)
    bounds = service.bounds()
    defaults = load_defaults(settings.data_dir, bounds)

    def current_title() -> str | None:
        model = service.current_model()
        return model.title if model is not None else None

    def checkpoint_choices() -> list[str]:
        titles = [e.title for e in service.checkpoints() if not e.error]
        current = current_title()
        if current and current not in titles:
            titles.insert(0, current)
        return titles

    def family_of(choice: str | None) -> str | None:
        """The architecture family of the session's checkpoint, when known."""
        model = service.current_model()
        if model is not None and (not choice or choice == model.title):
            return model.family
        try:
            entry = service.resolve_checkpoint(choice or "")
        except LorastackError:
            return None
        return entry.family

    def slider(name: str, **extra: Any) -> gr.Slider:
        spec = field_spec(name, bounds)
        return gr.Slider(
            spec.minimum,
            spec.maximum,
            value=defaults.get(name, spec.default),
            step=spec.step,
            label=spec.label,
            elem_id=name,
            **extra,
        )

    def txt2img(
        prompt: str,
        negative_prompt: str,
        steps: float,
        cfg_scale: float,
        sampler_name: str,
        scheduler: str,
        seed: float,
        width: float,
        height: float,
        batch_size: float,
        n_iter: float,
        clip_skip: float,
        checkpoint: str | None,
        loras: Any,
        subseed: float,
        subseed_strength: float,
        seed_resize_from_w: float,
        seed_resize_from_h: float,
        tiling: bool,
        randn_source: str,
        request: gr.Request,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio injects it
    ) -> Iterator[tuple[Any, ...]]:
        """Submit the job; stream progress and previews; save every image; return the
        gallery, the first image's infotext, the seeds and the job id (for Interrupt)."""
        named = (*API_FIELDS, *EXTRA_FIELDS)
        given = {name: value for name, value in locals().items() if name in named}
        values = {}
        for name, value in given.items():
            spec = field_spec(name, bounds)
            values[name] = spec.default if value is None else spec.kind(value)
        try:
            generation = request_from_dict(
                {
                    **values,
                    "checkpoint": None if checkpoint in (None, "", DEMO_MODEL_NAME) else checkpoint,
                    "loras": specs_from_rows(rows_from_value(loras)),
                }
            )
            for item in follow_job(service, generation, page_user(request), preview_every):
                if isinstance(item, str):  # the job id, kept for Interrupt
                    yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), item
                elif isinstance(item, ProgressSnapshot):
                    progress(item.fraction, desc=step_text(item))
                    if item.preview:
                        yield list(item.preview), gr.skip(), gr.skip(), gr.skip(), gr.skip()
                elif item is None:
                    gr.Info("Interrupted before it started")
                    yield [], "", [], [], ""
                    return
                else:
                    yield (*finish(item), "")
        except LorastackError as error:
            raise gr.Error(error.message) from error

    def finish(result: GenerationResult) -> tuple[list, str, list[int], list[str]]:
        gallery = []
        for image, seed_used, infotext in zip(
            result.images, result.seeds, result.infotexts, strict=True
        ):
            path = save_png(
                settings.outputs_dir, write_png_with_infotext(image, infotext), seed_used
            )
            gallery.append((str(path), f"seed {seed_used}"))
        notes = list(result.notes)
        if result.interrupted:
            notes.insert(0, f"interrupted: {len(result.images)} image(s) finished")
        for note in notes:
            if "replaces the stack weight" in note:
                gr.Warning(note)
        return gallery, result.infotexts[0] if result.infotexts else "", result.seeds, notes

    with gr.Blocks(title="lorastack") as page:
        gr.HTML("", js_on_load=PAGE_JS, elem_id="page_script")
        gr.Markdown("# lorastack")
        model = service.current_model()
        if model is not None and model.is_demo:
            gr.Markdown(
                "**Demo model:** no checkpoint was found, so the built-in tiny model with "
                "random weights is running; its images are noise. Put a Stable Diffusion "
                "checkpoint into `models/` and refresh."
            )
        with gr.Row():
            checkpoint = gr.Dropdown(
                checkpoint_choices(),
                value=current_title(),
                label="Stable Diffusion checkpoint",
                allow_custom_value=True,
                elem_id="checkpoint",
                scale=4,
            )
            refresh_models = gr.Button(
                "Refresh", scale=0, min_width=80, elem_id="checkpoint_refresh"
            )
        with gr.Tabs() as tabs:
            with gr.Tab("txt2img", id="txt2img"):
                with gr.Row():
                    with gr.Column(scale=3):
                        controls = build_controls(slider, defaults)
                        prompt = controls["prompt"]
                        panel = build_stack(page, prompt)
                    with gr.Column(scale=2):
                        with gr.Row():
                            run = gr.Button("Generate", variant="primary", elem_id="generate")
                            stop = gr.Button("Interrupt", elem_id="interrupt")
                        gallery = gr.Gallery(
                            label="Images", elem_id="gallery", columns=2, format="png"
                        )
                        info = gr.Textbox(
                            label="Parameters", lines=5, elem_id="infotext", interactive=False
                        )
                        seeds = gr.JSON(visible=False, label="seeds")
                        notes = gr.Markdown(elem_id="notes")
                        with gr.Row():
                            dice = gr.Button("Random seed (-1)", size="sm", elem_id="random_seed")
                            reuse = gr.Button("Reuse last seed", size="sm", elem_id="reuse_seed")
                with gr.Accordion("LoRAs", open=True, elem_id="lora_library"):
                    build_library(service, panel, prompt, checkpoint, family_of, refresh_seconds)
            with gr.Tab("PNG Info", id="pnginfo"):
                build_pnginfo(service, controls, checkpoint, panel, tabs, notes)
            with gr.Tab("Add files", id="files"):
                build_files_tab(
                    service,
                    policy,
                    checkpoint,
                    panel.library_version,
                    checkpoint_choices,
                    hide_paths=settings.hide_paths,
                    env=None if env is None else dict(env),
                    admin_check=files_admin_check(settings),
                )
            with gr.Tab("Settings", id="settings"):
                build_settings(service, settings, page, controls)

        note_state = gr.State([])
        job_state = gr.State("")  # this session's running job, for Interrupt
        inputs = [
            *(controls[name] for name in API_FIELDS),
            checkpoint,
            panel.stack,
            *(controls[name] for name in EXTRA_FIELDS),
        ]
        parameters = list(inspect.signature(txt2img).parameters)
        assert parameters[: len(inputs)] == [*API_FIELDS, "checkpoint", "loras", *EXTRA_FIELDS]
        generated = run.click(
            txt2img,
            inputs,
            [gallery, info, seeds, note_state, job_state],
            api_name="txt2img",
            concurrency_limit=None,
        )
        generated.then(lambda found: "\n".join(f"ℹ {n}" for n in found), note_state, notes, **QUICK)

        def interrupt(job_id: str, request: gr.Request) -> None:
            gr.Info(interrupt_jobs(service, job_id, page_user(request)))

        stop.click(interrupt, job_state, None, queue=False, api_visibility="private")
        dice.click(lambda: -1, None, controls["seed"], **QUICK)
        reuse.click(lambda used: used[0] if used else gr.skip(), seeds, controls["seed"], **QUICK)

        def rescan_models() -> gr.Dropdown:
            service.rescan()
            return gr.Dropdown(choices=checkpoint_choices())

        refresh_models.click(rescan_models, None, checkpoint, **QUICK)
    return page


def files_admin_check(settings: Settings) -> Callable[[str, str], str | None] | None:
    """On a shared server (`--listen`, `--share`, a Space) adding files is an admin action
    (CONTRACT); on one that only this machine can reach it is not."""
    if not (settings.listen or settings.share):
        return None
    return lambda user, password: admin_refusal(settings, user, password)


def page_user(request: gr.Request | None) -> str:
    """Who a page request is, for per-user limits and "my jobs": the logged-in user when
    Gradio checked a login, else the client address."""
    client = getattr(request, "client", None)
    return user_key(getattr(request, "username", None), getattr(client, "host", None))


def follow_job(
    service: GenerationService, request: GenerationRequest, user: str, preview_every: int
) -> Iterator[str | ProgressSnapshot | GenerationResult | None]:
    """Submit `request`; yield its job id, then progress snapshots, then the result (None
    when it was taken out of the queue before it started)."""
    updates: queue.Queue[ProgressSnapshot] = queue.Queue()
    job = service.submit(request, user=user, on_progress=updates.put, preview_every=preview_every)
    yield job
    while True:
        snapshot = updates.get()
        if snapshot.state in FINAL_STATES:
            break
        if snapshot.state == "running":
            yield snapshot
    if snapshot.state == "cancelled":
        yield None
        return
    yield service.result(job)


def interrupt_jobs(service: GenerationService, job_id: str, user: str) -> str:
    """Interrupt this session's job; with none known (a new tab, or the tab that started
    it was closed), the user's own queued and running jobs."""
    if job_id and service.interrupt(job_id):
        return "Interrupting after the current step"
    mine = [info.job_id for info in service.jobs(user)]
    stopped = sum(service.interrupt(job) for job in mine)
    return f"Interrupting {stopped} job(s) of yours" if stopped else "Nothing of yours is running"


def step_text(update: ProgressSnapshot) -> str:
    batch = f"batch {update.job_no + 1}/{update.job_count}, " if update.job_count > 1 else ""
    return (
        f"{batch}step {update.sampling_step}/{update.sampling_steps}, ETA {update.eta_seconds:.0f}s"
    )


def build_controls(slider: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    """The request fields' components, keyed by schema.FIELDS name."""
    controls: dict[str, Any] = {}
    controls["prompt"] = gr.Textbox(
        label="Prompt (Ctrl+Enter generates)",
        lines=3,
        elem_id="prompt",
        placeholder=field_spec("prompt").help,
    )
    controls["negative_prompt"] = gr.Textbox(
        value=defaults["negative_prompt"],
        label="Negative prompt",
        lines=2,
        elem_id="negative_prompt",
    )
    with gr.Row():
        controls["sampler_name"] = gr.Dropdown(
            list(SAMPLER_NAMES), value=defaults["sampler_name"], label="Sampling method"
        )
        controls["scheduler"] = gr.Dropdown(
            list(SCHEDULER_LABELS),
            value=scheduler_label(defaults["scheduler"]),
            label="Schedule type",
        )
        controls["steps"] = slider("steps")
    with gr.Row():
        controls["width"] = slider("width")
        controls["height"] = slider("height")
    with gr.Row():
        controls["n_iter"] = slider("n_iter")
        controls["batch_size"] = slider("batch_size")
    with gr.Row():
        controls["cfg_scale"] = slider("cfg_scale")
        seed = field_spec("seed")
        controls["seed"] = gr.Number(
            value=seed.default, label=seed.label, precision=0, elem_id="seed", info=seed.help
        )
        controls["clip_skip"] = slider("clip_skip")
        controls["tiling"] = gr.Checkbox(False, label="Tiling", elem_id="tiling", min_width=80)
    with gr.Accordion("Extra seed options", open=False, elem_id="seed_extras"):
        with gr.Row():
            subseed = field_spec("subseed")
            controls["subseed"] = gr.Number(
                value=subseed.default,
                label=subseed.label,
                precision=0,
                elem_id="subseed",
                info=subseed.help,
            )
            controls["subseed_strength"] = slider("subseed_strength")
        with gr.Row():
            controls["seed_resize_from_w"] = slider("seed_resize_from_w")
            controls["seed_resize_from_h"] = slider("seed_resize_from_h")
        source = field_spec("randn_source")
        controls["randn_source"] = gr.Radio(
            list(RANDN_SOURCES),
            value=source.default,
            label=source.label,
            info=source.help,
            elem_id="randn_source",
        )
    return controls
