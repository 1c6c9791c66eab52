"""The Gradio page: a thin client of the generation service that builds GenerationRequests.

Layout: txt2img (prompt, parameters, Hires fix, LoRA stack, results, LoRA list), img2img (the same
fields with image sub-tabs: img2img, Inpaint, Inpaint upload, Outpaint), Extras
(upscaling), PNG Info, Add files, Settings. Per-user choices (checkpoint, stack, fields,
the running job's id) are component values or `gr.State`, so each browser session has its
own; jobs, their order and the per-user limits belong to the service (shared with the API
and the CLI).
"""

from __future__ import annotations

import functools
import html
import inspect
import queue
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from deployments.ingest import IngestPolicy
from deployments.lora_sources import LoraSources
from frontends.page.checkpoint_cards import build_checkpoint_cards, listing_signature
from frontends.page.controlnet_panel import (
    CONTROLNET_FIELDS,
    build_controlnet,
    units_from_values,
)
from frontends.page.defaults import load_defaults, scheduler_label
from frontends.page.embeddings_panel import build_embeddings
from frontends.page.errors import user_error
from frontends.page.extras_tab import build_extras_tab
from frontends.page.fewstep_panel import TARGETS as FEWSTEP_TARGETS
from frontends.page.fewstep_panel import build_checkpoint_suggestion, wire_checkpoint
from frontends.page.files_tab import build_files_tab
from frontends.page.gallery_tab import build_gallery_tab, note_owner
from frontends.page.gpu_time import build_gpu_time
from frontends.page.hires_panel import (
    HIRES_FIELDS,
    SAME_CHECKPOINT,
    build_hires,
    hires_from_values,
    wire_final_resolution,
)
from frontends.page.identity import (
    SESSION_NOTE,
    oauth_enabled,
    on_space,
    output_owner,
    visitor_key,
)
from frontends.page.img2img_tab import (
    SendTargets,
    build_images,
    build_options,
    fit_size,
    image_request,
    stack_text,
)
from frontends.page.lora_panel import QUICK, build_library, build_stack
from frontends.page.lora_sources_panel import PreviewMaker, build_lora_sources_panel
from frontends.page.open_folder import build_open_folder
from frontends.page.refiner_panel import (
    NO_REFINER,
    REFINER_FIELDS,
    build_refiner,
    refiner_request_fields,
)
from frontends.page.scripts_panel import SCRIPT_FIELDS, build_scripts_panel, script_requests
from frontends.page.stack import fit_notes, rows_from_value, specs_from_rows
from frontends.page.starters_panel import build_starters
from frontends.page.styles_panel import build_styles, wire_styles
from frontends.page.tabs import (
    Txt2ImgTargets,
    admin_refusal,
    build_pnginfo,
    build_settings,
    wire_send_to_txt2img,
)
from frontends.page.waiting import FINAL_STATES, next_snapshot, waiting_text
from frontends.page.xyz_panel import XYZ_TITLE, XYZ_VALUES, xyz_plot_from_values
from pipelines.errors import LorastackError
from pipelines.images import open_image
from pipelines.infotext import parse_infotext
from pipelines.interface import (
    DEMO_MODEL_NAME,
    GenerationService,
    ProgressSnapshot,
)
from pipelines.output import batch_number, save_image
from pipelines.samplers import SAMPLER_NAMES, SCHEDULER_LABELS, schedulers_for
from pipelines.schema import (
    RANDN_SOURCES,
    VAE_AUTOMATIC,
    VAE_NONE,
    GenerationRequest,
    GenerationResult,
    field_spec,
    request_from_dict,
    size_adjustments,
)
from pipelines.settings import Settings
from pipelines.xyz import GridOutput, GridPlan, XyzPlot, assemble_grid, plan_grid

if TYPE_CHECKING:
    from deployments.firstrun import BackgroundDownload

DEMO_BANNER = (
    "**Demo model:** no checkpoint was found, so the built-in tiny model with random weights "
    "is running; its images are noise."
)

Shown = tuple[list, str, list[int], list[str], list[str]]
"""What a finished run shows: gallery, first infotext, seeds, notes, each image's infotext."""
SKIPPED = gr.skip()
KEEP_SHOWN = (SKIPPED,) * 5
"""A stream update that leaves what the result area shows as it is."""
ERROR_NOTE = "Error: "
"""How a refused run's message starts in the notes, where it stays until the next run."""

PREVIEW_EVERY = 3
"""Steps between two live previews."""

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
    "eta_noise_seed_delta",
)
"""A1111's "Extra" seed row (with its ENSD setting) and tiling: after `loras`, so
positional API callers of the first version keep working."""

PAGE_JS = """
const style = document.createElement('style');
style.textContent = `
  .lora-cards, .embedding-cards { flex-wrap: wrap !important; gap: 8px; }
  .lora-card, .embedding-card { border: 1px solid var(--border-color-primary);
               border-radius: 8px; padding: 6px; max-width: 220px; }
  .lora-incompatible, .embedding-incompatible { opacity: 0.45; }
  .lora-thumb { width: 100%; max-height: 128px; object-fit: cover; border-radius: 4px; }
  .lora-nothumb { height: 48px; display: flex; align-items: center; justify-content: center;
                  color: var(--body-text-color-subdued); font-size: 12px; }
  .lora-name, .embedding-name { font-weight: 600; word-break: break-all; }
  .checkpoint-card-body .lora-thumb { max-height: 128px; }
  .lora-facts, .lora-alias, .lora-words, .embedding-facts { font-size: 12px; }
  .lora-why { font-size: 12px; color: var(--color-accent); }
  .lora-coverage { font-size: 12px; word-break: break-all; }
  @media (max-width: 640px) {  /* phones: Generate and the result above the settings */
    .main-row { flex-direction: column-reverse !important; }
    .stack-row { flex-wrap: nowrap !important; }
    .stack-row > * { min-width: 0 !important; }
  }
  .job-progress { position: relative; border: 1px solid var(--border-color-primary);
                  border-radius: 6px; min-height: 28px; overflow: hidden; font-size: 13px; }
  .job-progress-bar { position: absolute; inset: 0 auto 0 0; background: var(--color-accent);
                      opacity: 0.35; }
  .job-progress span { position: relative; padding: 4px 8px; display: inline-block; }
  .clamp-note { font-size: 12px; color: var(--color-accent); }
  .token-counter { font-size: 12px; text-align: right; color: var(--body-text-color-subdued); }
  .lora-fewstep, #checkpoint_fewstep { font-size: 12px; }
`;
document.head.appendChild(style);
document.addEventListener('blur', (event) => {  // before Gradio clamps a typed value
  const box = event.target;
  if (!(box instanceof HTMLInputElement) || box.type !== 'number' || !box.closest) {
    return;
  }
  const block = box.closest('.block');
  const typed = parseFloat(box.value);
  if (!block || Number.isNaN(typed)) {
    return;
  }
  const low = box.min === '' ? -Infinity : parseFloat(box.min);
  const high = box.max === '' ? Infinity : parseFloat(box.max);
  let said = '';
  if (typed < low) {
    said = `${typed} is below the minimum ${low}: set to ${low}`;
  } else if (typed > high) {
    said = `${typed} is above the maximum ${high}: set to ${high}`;
  }
  let note = block.querySelector(':scope > .clamp-note');
  if (!said) {
    note?.remove();
    return;
  }
  if (!note) {
    note = document.createElement('div');
    note.className = 'clamp-note';
    block.appendChild(note);
  }
  note.textContent = said;
}, true);
document.addEventListener('input', (event) => {  // typing again: the old note is stale
  event.target.closest?.('.block')?.querySelector(':scope > .clamp-note')?.remove();
}, true);
document.addEventListener('keydown', (event) => {
  if (event.key !== 'Enter' || !(event.ctrlKey || event.metaKey) || !event.target.closest) {
    return;
  }
  for (const tab of ['', 'img2img_']) {
    if (event.target.closest(`#${tab}prompt, #${tab}negative_prompt`)) {
      event.preventDefault();
      document.querySelector(`#${tab}generate`)?.click();
    }
  }
});
"""
"""Page styling, and Ctrl+Enter in a prompt box generates (as in A1111)."""


@dataclass
class Results:
    """A tab's Generate/Interrupt buttons, gallery, parameters, seed and "Send to" buttons."""

    run: gr.Button
    stop: gr.Button
    skip: gr.Button
    progress: gr.HTML  # where the progress bar stays while previews and batches stream
    gallery: gr.Gallery
    selected: gr.State  # the gallery index the user clicked, for "Send to"
    info: gr.Textbox
    seeds: gr.JSON
    notes: gr.Markdown
    dice: gr.Button
    reuse: gr.Button
    send_img2img: gr.Button
    send_inpaint: gr.Button
    send_extras: gr.Button


def build_ui(
    service: GenerationService,
    settings: Settings,
    *,
    demo_reason: str | None = None,
    first_download: BackgroundDownload | None = None,
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
        demo_reason: why no checkpoint was downloaded on first run (the demo banner says it).
        first_download: the first-run download under way: its progress shows under the
            banner, and the checkpoint menu takes the file once it is loaded.
        preview_every: steps between live previews.
        refresh_seconds: how often the LoRA list checks the folders.
        policy: the rules for the Add files tab (default: from the settings).
        env: the environment (os.environ by default): Space storage and identity.
    """
    policy = policy or IngestPolicy.from_settings(settings)
    bounds = service.bounds()
    defaults = load_defaults(settings.data_dir, bounds)
    owner_of = functools.partial(output_owner, settings, env=env)  # whose saved images

    def current_title() -> str | None:
        model = service.current_model()
        return model.title if model is not None else None

    def vae_choices() -> list[str]:
        """A1111's SD VAE list: Automatic, None, then the usable VAE files by name."""
        return [VAE_AUTOMATIC, VAE_NONE, *(e.name for e in service.vaes() if not e.error)]

    def checkpoint_choices(marked: bool = False) -> list[Any]:
        """The usable checkpoints' titles; `marked` adds the unusable ones, labelled with
        why (a (label, relpath) pair: choosing one says why, Generate refuses it)."""
        entries = service.checkpoints()
        titles: list[Any] = [e.title for e in entries if not e.error]
        current = current_title()
        if current and current not in titles:
            titles.insert(0, current)
        if marked:
            titles += [(unusable_label(e.relpath, e.error), e.relpath) for e in entries if e.error]
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

    def stack_fits(prompt: str, rows: list, choice: str | None) -> list[str]:
        """The stack's rows and tags that do not fit the session's checkpoint."""
        return fit_notes(prompt, rows, service.resolve_lora, family_of(choice))

    def slider(name: str, prefix: str = "") -> gr.Slider:
        spec = field_spec(name, bounds)
        return gr.Slider(
            spec.minimum,
            spec.maximum,
            value=defaults.get(name, spec.default),
            step=spec.step,
            label=spec.label,
            elem_id=prefix + name,
            buttons=[],  # no ↺: it reset to the start-up value, not the saved default
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
        eta_noise_seed_delta: float,
        enable_hr: bool,
        hr_upscaler: str,
        hr_second_pass_steps: float,
        denoising_strength: float,
        hr_scale: float,
        hr_resize_x: float,
        hr_resize_y: float,
        hr_checkpoint_name: str,
        hr_sampler_name: str,
        hr_scheduler: str,
        hr_prompt: str,
        hr_negative_prompt: str,
        script_name: str,
        prompts_iterate_seed: bool,
        prompts_same_seed: bool,
        prompts_position: str,
        prompts_text: str,
        xyz_x_type: str,
        xyz_x_values: str,
        xyz_y_type: str,
        xyz_y_values: str,
        xyz_z_type: str,
        xyz_z_values: str,
        xyz_draw_legend: bool,
        xyz_no_fixed_seeds: bool,
        xyz_vary_seeds_x: bool,
        xyz_vary_seeds_y: bool,
        xyz_vary_seeds_z: bool,
        xyz_include_lone_images: bool,
        xyz_include_sub_grids: bool,
        xyz_margin_size: float,
        request: gr.Request,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio injects it
        styles: list[str] | None = None,  # last: callers from before styles leave it out
        refiner_checkpoint: str | None = None,
        refiner_switch_at: float | None = None,
        sd_vae: str = VAE_AUTOMATIC,
        controlnet_enabled: bool = False,
        controlnet_image: str | None = None,
        controlnet_module: str = "none",
        controlnet_model: str = "None",
        controlnet_weight: float = 1.0,
        controlnet_processor_res: float = -1,
        controlnet_threshold_a: float = -1,
        controlnet_threshold_b: float = -1,
        controlnet_guidance_start: float = 0.0,
        controlnet_guidance_end: float = 1.0,
        controlnet_control_mode: str = "Balanced",
        controlnet_resize_mode: str = "Crop and Resize",
        controlnet_pixel_perfect: bool = False,
    ) -> Iterator[tuple[Any, ...]]:
        """Submit the job; stream progress and previews; save every image; return the
        gallery, the first image's infotext, the seeds and the job id (for Interrupt).
        With Hires. fix on, the request carries its HiresFix and denoising strength; with
        the X/Y/Z plot script, the cells run as one job and the gallery shows the grid."""
        named = (*API_FIELDS, *EXTRA_FIELDS)
        scope = locals()
        given = {name: value for name, value in scope.items() if name in named}
        hires_values = {name: value for name, value in scope.items() if name in HIRES_FIELDS}
        xyz_values = {name: scope[f"xyz_{name}"] for name in XYZ_VALUES}
        unit_values = {name: value for name, value in scope.items() if name in CONTROLNET_FIELDS}
        try:
            hires = hires_from_values({**hires_values, "sampler_name": sampler_name})
            plot = xyz_plot_from_values(xyz_values) if script_name == XYZ_TITLE else None
            units = units_from_values(unit_values)
        except LorastackError as error:
            raise user_error(error.message) from error
        if hires is not None:
            given["denoising_strength"] = denoising_strength
        extra: dict[str, Any] = {"styles": tuple(styles or ()), "vae": sd_vae or VAE_AUTOMATIC}
        extra.update(refiner_request_fields(refiner_checkpoint, refiner_switch_at))
        extra["controlnet"] = units
        if hires is not None:
            extra["hires"] = hires
        script = (script_name, prompts_iterate_seed, prompts_same_seed, prompts_position)
        script_values = () if plot is not None else (*script, prompts_text)
        yield from generate(given, checkpoint, loras, extra, request, progress, script_values, plot)

    def img2img(
        data: dict[Any, Any],
        request: gr.Request,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio injects it
    ) -> Iterator[tuple[Any, ...]]:
        """txt2img's stream for a request with the selected sub-tab's image inputs; its
        inputs arrive by component (a set), never by position."""
        try:
            images, size = image_request({n: data[c] for n, c in panel_images.values.items()})
        except LorastackError as error:
            raise user_error(error.message) from error
        given = {name: data[component] for name, component in i2i_controls.items()}
        refiner = refiner_request_fields(*(given.pop(name) for name in REFINER_FIELDS))
        try:
            units = units_from_values({n: data[c] for n, c in i2i_units.values.items()})
        except LorastackError as error:
            raise gr.Error(error.message) from error
        if size is not None:  # outpainting: the canvas's size
            given["width"], given["height"] = size
        stack = data[panel.stack]
        extra = {
            "img2img": images,
            "styles": tuple(data[i2i_styles.dropdown] or ()),
            "vae": data[sd_vae] or VAE_AUTOMATIC,
            "controlnet": units,
            **refiner,
        }
        yield from generate(given, data[checkpoint], stack, extra, request, progress)

    def generate(
        given: dict[str, Any],
        checkpoint: str | None,
        loras: Any,
        extra: dict[str, Any],
        request: gr.Request,
        progress: gr.Progress,
        script_values: tuple[Any, ...] = (),
        plot: XyzPlot | None = None,
    ) -> Iterator[tuple[Any, ...]]:
        """Build the request from the fields and `extra` (its other fields), submit it and
        stream it; with a script (`script_values`), its requests as one job; with an X/Y/Z
        `plot`, its cells as one job and the grid. Every user error shows in the page."""
        started = time.perf_counter()
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
                    **extra,
                }
            )
            adjusted = size_adjustments(generation.width, generation.height)
            plan = None if plot is None else plan_grid(generation, plot, bounds)
            unit = "cell" if plan is not None and generation.n_iter == 1 else "batch"
            series = script_requests(generation, *script_values) if script_values else None
            user = page_user(request)
            items = (
                follow_series(service, series, user, preview_every)
                if series is not None
                else follow_job(service, generation, user, preview_every, plan)
            )
            early: Shown = ([], "", [], [], [])  # batches shown and saved before the end
            for item in items:
                if isinstance(item, str):  # the job id, kept for Interrupt
                    yield *KEEP_SHOWN, item, progress_bar(None)
                elif isinstance(item, ProgressSnapshot) and item.state == "queued":
                    progress(0.0, desc=waiting_text(item))
                    yield *KEEP_SHOWN, gr.skip(), progress_bar(item, unit)
                elif isinstance(item, ProgressSnapshot):
                    progress(item.fraction, desc=step_text(item, unit))
                    bar = progress_bar(item, unit)
                    if item.finished is not None:  # a batch of the batch count: now
                        batch = finish([item.finished], generation.kind, owner=owner_of(request))
                        early = joined(early, batch)
                        gallery, info, seeds, _, infotexts = early
                        yield gallery, info, seeds, gr.skip(), infotexts, gr.skip(), bar
                    elif item.preview:
                        shown = [*early[0], *item.preview]
                        yield shown, *KEEP_SHOWN[1:], gr.skip(), bar
                    else:
                        yield *KEEP_SHOWN, gr.skip(), bar
                elif item is None:
                    gr.Info("Interrupted before it started")
                    yield [], "", [], [], [], "", ""
                    return
                elif isinstance(item, GridOutput):
                    result = item.as_result(generation)
                    shown = finish([result], generation.kind, item.grids, owner=owner_of(request))
                    for image, infotext, seed_used in item.unshown:  # saved, not shown
                        kind = f"{generation.kind}-images"
                        path = save_image(
                            settings.outputs_dir,
                            image,
                            infotext,
                            seed_used,
                            kind=kind,
                            options=service.save_options,
                        )
                        note_owner(service, path, owner_of(request))
                    yield (*timed(shown, started, adjusted), "", "")
                else:
                    results = item if isinstance(item, list) else [item]
                    results[0] = after_shown(results[0], len(early[0]))
                    owner = owner_of(request)
                    rest = finish(results, generation.kind, already=len(early[0]), owner=owner)
                    shown = joined(early, rest)
                    yield (*timed(shown, started, adjusted), "", "")
        except LorastackError as error:
            raise user_error(error.message) from error

    def finish(
        results: list[GenerationResult],
        kind: str,
        grids: int = 0,
        already: int = 0,
        owner: str | None = None,
    ) -> Shown:
        """Save every image of every result (the first `grids` to the grids folder; each
        `owner`'s in the gallery; `already` shown before, for the interrupted note); the
        gallery, first infotext, seeds, notes and each shown image's infotext."""
        gallery, seeds, infotexts, notes, shown_infotexts = [], [], [], [], []
        saving = service.save_options
        for result in results:
            for index, (image, seed_used, infotext) in enumerate(
                zip(result.images, result.seeds, result.infotexts, strict=True)
            ):
                grid = len(gallery) < grids
                path = save_image(
                    settings.outputs_dir,
                    image,
                    infotext,
                    seed_used,
                    kind=f"{kind}-grids" if grid else f"{kind}-images",
                    options=saving,
                    batch_number=None if grid else batch_number(index, result.request.batch_size),
                )
                note_owner(service, path, owner)
                gallery.append((str(path), f"seed {seed_used}"))
                shown_infotexts.append(infotext)
            seeds += result.seeds
            infotexts += result.infotexts
            notes += result.notes
            if result.interrupted:
                notes.insert(0, f"interrupted: {already + len(gallery)} image(s) finished")
        for note in notes:
            if "replaces the stack weight" in note:
                gr.Warning(note)
        first = infotexts[0] if infotexts else ""
        return gallery, first, seeds, notes, shown_infotexts

    shared = files_admin_check(settings) is not None  # styles: admin actions when shared
    # "Open output folder" opens on the server's screen: only for a user sitting there
    local_outputs = None if shared or on_space(env) else settings.outputs_dir
    with gr.Blocks(title="lorastack") as page:
        gr.HTML("", js_on_load=PAGE_JS, elem_id="page_script")
        gr.Markdown("# lorastack")
        if on_space(env) and not oauth_enabled(env):
            gr.Markdown(SESSION_NOTE, elem_id="session_note")
        model = service.current_model()
        downloading = first_download is not None and not first_download.finished.is_set()
        demo_banner = starters = None
        if model is not None and (model.is_demo or downloading):
            demo_banner = gr.Markdown(
                DEMO_BANNER
                + " "
                + (
                    "The default checkpoint is being downloaded and replaces it when done."
                    if downloading
                    else "Put a Stable Diffusion checkpoint into `models/` and refresh."
                )
                + (f" Why none was downloaded: {demo_reason}." if demo_reason else ""),
                elem_id="demo_banner",
            )
            starters = build_starters(
                service, settings.models_dirs[0], files_admin_check(settings), not downloading
            )
        download_line = gr.Markdown(
            first_download.line() if downloading and first_download else "",
            visible=downloading,
            elem_id="first_download",
        )
        with gr.Row():
            checkpoint = gr.Dropdown(
                checkpoint_choices(marked=True),
                value=current_title(),
                label="Stable Diffusion checkpoint",
                allow_custom_value=True,
                elem_id="checkpoint",
                scale=4,
            )
            sd_vae = gr.Dropdown(
                vae_choices(),
                value=VAE_AUTOMATIC,
                label="SD VAE",
                elem_id="sd_vae",
                scale=2,
            )
            refresh_models = gr.Button(
                "Refresh", scale=0, min_width=80, elem_id="checkpoint_refresh"
            )
        fewstep_note, fewstep_use = build_checkpoint_suggestion(service)
        with gr.Tabs() as tabs:
            with gr.Tab("txt2img", id="txt2img"):
                with gr.Row(elem_classes=["main-row"]):
                    with gr.Column(scale=3):
                        counters: dict[str, gr.HTML] = {}
                        controls = build_prompts(defaults, counters=counters)
                        styles = build_styles(
                            service, controls["prompt"], controls["negative_prompt"], shared=shared
                        )
                        controls.update(build_parameters(slider, defaults))
                        build_gpu_time(service, controls)
                        hires, hires_final = build_hires(
                            service.upscaler_names, checkpoint_choices, bounds, page
                        )
                        controls.update(hires)
                        controls.update(build_refiner(checkpoint_choices, slider))
                        units = build_controlnet(service)
                        prompt = controls["prompt"]
                        panel = build_stack(page, prompt, checkpoint, stack_fits)
                        scripts = build_scripts_panel()
                    with gr.Column(scale=2):
                        results = build_results("txt2img", "", local_outputs)
                previews = PreviewMaker(
                    service,
                    results.gallery,
                    results.selected,
                    panel.library_version,
                    files_admin_check(settings),
                )
                with gr.Accordion("LoRAs", open=True, elem_id="lora_library"):
                    build_library(
                        service,
                        panel,
                        prompt,
                        checkpoint,
                        family_of,
                        refresh_seconds,
                        [controls[name] for name in FEWSTEP_TARGETS],
                        make_preview=previews.wire,
                    )
                with gr.Accordion("Checkpoints", open=False, elem_id="checkpoint_library"):
                    checkpoint_cards = build_checkpoint_cards(service, checkpoint)
                with gr.Accordion("Embeddings", open=False, elem_id="embedding_library"):
                    build_embeddings(
                        service, prompt, controls["negative_prompt"], checkpoint, refresh_seconds
                    )
            with (
                gr.Tab("img2img", id="img2img") as img2img_tab,
                gr.Row(elem_classes=["main-row"]),
            ):
                with gr.Column(scale=3):
                    i2i_counters: dict[str, gr.HTML] = {}
                    i2i_controls = build_prompts(defaults, "img2img_", i2i_counters)
                    i2i_styles = build_styles(
                        service,
                        i2i_controls["prompt"],
                        i2i_controls["negative_prompt"],
                        "img2img_",
                        shared=shared,
                    )
                    panel_images = build_images(service.upscaler_names())
                    build_options(panel_images)
                    i2i_controls["denoising_strength"] = slider("denoising_strength", "img2img_")
                    i2i_controls.update(build_parameters(slider, defaults, "img2img_"))
                    i2i_controls.update(build_refiner(checkpoint_choices, slider, "img2img_"))
                    i2i_units = build_controlnet(service, "img2img_")
                    stack_summary = gr.Markdown(stack_text([]), elem_id="img2img_stack_summary")
                with gr.Column(scale=2):
                    i2i_results = build_results("img2img", "img2img_", local_outputs)
            with gr.Tab("Extras", id="extras"):
                extras = build_extras_tab(
                    service, settings.outputs_dir, page, tabs, page_user, owner_of
                )
            with gr.Tab("Gallery", id="gallery"):
                browser = build_gallery_tab(service, page, files_admin_check(settings), owner_of)
            with gr.Tab("PNG Info", id="pnginfo"):
                pnginfo = build_pnginfo(
                    service,
                    {**controls, **units.values},  # the ControlNet unit is recalled too
                    checkpoint,
                    panel,
                    tabs,
                    results.notes,
                    styles.dropdown,
                    sd_vae,
                )
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
                previews.admin_fields = build_lora_sources_panel(
                    service,
                    LoraSources(service, policy, civitai_endpoint=settings.civitai_endpoint),
                    panel.library_version,
                    admin_check=files_admin_check(settings),
                )
            with gr.Tab("Settings", id="settings"):
                build_settings(
                    service,
                    settings,
                    page,
                    [controls, i2i_controls],
                    files_admin_check(settings),
                )

        inputs = [
            *(controls[name] for name in API_FIELDS),
            checkpoint,
            panel.stack,
            *(controls[name] for name in EXTRA_FIELDS),
            *(controls[name] for name in HIRES_FIELDS),
            *scripts.inputs,
            styles.dropdown,
            *(controls[name] for name in REFINER_FIELDS),
            sd_vae,
            *units.inputs,
        ]
        special = ("request", "progress")  # Gradio injects them where they stand
        parameters = [p for p in inspect.signature(txt2img).parameters if p not in special]
        named = [*API_FIELDS, "checkpoint", "loras", *EXTRA_FIELDS, *HIRES_FIELDS, *SCRIPT_FIELDS]
        named += ["styles", *REFINER_FIELDS, "sd_vae", *CONTROLNET_FIELDS]
        assert parameters[: len(inputs)] == named
        wire_final_resolution(hires_final, hires, controls["width"], controls["height"])
        wire_token_counters(service, controls, counters, checkpoint, page)
        wire_token_counters(service, i2i_controls, i2i_counters, checkpoint, page)
        for tab in (controls, i2i_controls):
            wire_schedule_choices(tab["sampler_name"], tab["scheduler"], page)
        wire_checkpoint(
            service,
            page,
            checkpoint,
            fewstep_note,
            fewstep_use,
            [controls[name] for name in FEWSTEP_TARGETS],
        )
        wire_results(service, results, controls, txt2img, inputs, "txt2img")
        i2i_inputs = {
            *i2i_controls.values(),
            *panel_images.values.values(),
            checkpoint,
            panel.stack,
            i2i_styles.dropdown,
            sd_vae,
            *i2i_units.inputs,
        }
        wire_results(service, i2i_results, i2i_controls, img2img, i2i_inputs, None)
        wire_styles(service, page, [styles, i2i_styles], files_admin_check(settings))
        img2img_tab.select(stack_text, panel.stack, stack_summary, **QUICK)
        page.load(
            lambda: gr.Radio(choices=service.upscaler_names()),
            None,
            panel_images.values["sd_upscale_upscaler"],
            **QUICK,
        )

        def auto_size(upload: str | dict | None) -> tuple[Any, Any]:
            """Width and height from a new upload: its size, rounded down to 8. A file
            that cannot be read leaves them; generating says why."""
            path = upload.get("background") if isinstance(upload, dict) else upload
            if not path:
                return gr.skip(), gr.skip()
            try:
                with open_image(path) as image:
                    return fit_size(*image.size, bounds)
            except LorastackError:
                return gr.skip(), gr.skip()

        size = [i2i_controls["width"], i2i_controls["height"]]
        for upload in ("image", "editor", "upload_image"):
            component = panel_images.values[upload]
            component.upload(auto_size, component, size, **QUICK)

        send = SendTargets(
            service,
            bounds,
            tabs,
            panel_images,
            i2i_controls,
            checkpoint,
            panel,
            i2i_results.notes,
            stack_summary,
            i2i_styles.dropdown,
        )
        for source in (results, i2i_results):
            sources = [source.gallery, source.selected]
            send.wire(source.send_img2img, "img2img", sources, selected_path)
            send.wire(source.send_inpaint, "inpaint", sources, selected_path)
        send.wire(browser.send_img2img, "img2img", [browser.path], lambda path: path or None)
        send.wire(browser.send_inpaint, "inpaint", [browser.path], lambda path: path or None)
        extras.wire_send(browser.send_extras, [browser.path], lambda path: path or None)
        wire_send_to_txt2img(
            service,
            browser.send_txt2img,
            browser.infotext,
            Txt2ImgTargets(
                {**controls, **units.values},
                checkpoint,
                panel,
                tabs,
                results.notes,
                styles.dropdown,
                sd_vae,
            ),
        )
        send.wire(pnginfo.send_img2img, "img2img", [pnginfo.image], lambda path: path)
        send.wire(pnginfo.send_inpaint, "inpaint", [pnginfo.image], lambda path: path)
        for source in (results, i2i_results):
            extras.wire_send(source.send_extras, [source.gallery, source.selected], selected_path)
        extras.wire_send(pnginfo.send_extras, [pnginfo.image], lambda path: path)

        def model_dropdowns() -> tuple[gr.Dropdown, ...]:
            """The checkpoint menus and the SD VAE menu with today's listings."""
            choices = checkpoint_choices()
            refiners = gr.Dropdown(choices=[NO_REFINER, *choices])
            return (
                gr.Dropdown(choices=checkpoint_choices(marked=True)),
                gr.Dropdown(choices=[SAME_CHECKPOINT, *choices]),
                refiners,
                refiners,
                gr.Dropdown(choices=vae_choices()),
            )

        def models_signature() -> str:
            listed = [(e.title, e.error) for e in service.checkpoints()]
            return repr((listed, vae_choices()))

        def rescan_models() -> tuple[gr.Dropdown, ...]:
            service.rescan()
            return model_dropdowns()

        def poll_models(shown: str, cards_shown: str) -> tuple[Any, ...]:
            """Open pages follow the folders as the LoRA list does: the dropdowns and the
            checkpoint cards, in one request per tick."""
            signature, cards = models_signature(), listing_signature(service)
            dropdowns = (gr.skip(),) * 6 if signature == shown else (*model_dropdowns(), signature)
            return (*dropdowns, gr.skip() if cards == cards_shown else cards)

        built = (models_signature(), current_title())  # what the page's config holds

        def load_models() -> tuple[Any, ...]:
            """A new page: today's listings and the checkpoint loaded now (untouched when
            the page's config already shows them: an update re-renders the cards)."""
            if (models_signature(), current_title()) == built:
                return (gr.skip(),) * 5 + (built[0],)
            current = gr.Dropdown(choices=checkpoint_choices(marked=True), value=current_title())
            return (current, *model_dropdowns()[1:], models_signature())

        def say_why_unusable(choice: str | None) -> None:
            for entry in service.checkpoints():
                if entry.error and choice in (entry.relpath, entry.title):
                    gr.Warning(f"{entry.relpath} cannot be used: {entry.error}")

        refreshed = [checkpoint, hires["hr_checkpoint_name"]]
        refreshed += [tab["refiner_checkpoint"] for tab in (controls, i2i_controls)]
        refresh_models.click(rescan_models, None, [*refreshed, sd_vae], **QUICK)
        shown_models = gr.State("")
        models_timer = gr.Timer(refresh_seconds)
        following = [*refreshed, sd_vae, shown_models]
        models_timer.tick(
            poll_models,
            [shown_models, checkpoint_cards],
            [*following, checkpoint_cards],
            **QUICK,
        )
        page.load(load_models, None, following, **QUICK)
        checkpoint.input(say_why_unusable, checkpoint, None, **QUICK)
        if downloading and first_download is not None and demo_banner and starters:
            follow_download(
                first_download, download_line, (demo_banner, starters), checkpoint, current_title
            )
    return page


def follow_download(
    download: BackgroundDownload,
    line: gr.Markdown,
    demo: tuple[gr.Markdown, gr.Accordion],
    checkpoint: gr.Dropdown,
    current_title: Callable[[], str | None],
) -> None:
    """Show the first-run download's progress each second (`download_updates`)."""
    timer = gr.Timer(1.0)
    banner, starters = demo
    timer.tick(
        lambda: download_updates(download, current_title),
        None,
        [line, banner, starters, checkpoint, timer],
        **QUICK,
    )


def download_updates(
    download: BackgroundDownload, current_title: Callable[[], str | None]
) -> tuple[Any, ...]:
    """(progress line, demo banner, starter list, checkpoint menu, timer): while the bytes
    arrive only the line changes; once the file is in place the banner goes and the menu
    points at the file; after a failure the banner says what to do and the starter list
    shows. The timer stops once the download has ended."""
    if not download.finished.is_set():
        return download.line(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
    stop = gr.Timer(active=False)
    if download.placed is None:
        banner = gr.Markdown(
            DEMO_BANNER + " Put a Stable Diffusion checkpoint into `models/` "
            "and refresh, or download a starter below."
        )
        return download.line(), banner, gr.Accordion(visible=True), gr.skip(), stop
    menu = gr.Dropdown(value=current_title())
    return download.line(), gr.Markdown(visible=False), gr.skip(), menu, stop


def unusable_label(relpath: str, error: str | None, room: int = 60) -> str:
    """A checkpoint menu label for a file that cannot be used: its path and a short reason
    (the first clause of the error, without the file name it repeats)."""
    reason = (error or "unusable").removeprefix(f"{Path(relpath).name}:").strip()
    reason = reason.split(";")[0].strip()
    if len(reason) > room:
        reason = reason[: room - 1].rstrip() + "…"
    return f"⚠ {relpath} (unusable: {reason})"


def files_admin_check(settings: Settings) -> Callable[[str, str], str | None] | None:
    """On a shared server (`--listen`, `--share`, a Space) adding files is an admin action
    (CONTRACT); on one that only this machine can reach it is not."""
    if not (settings.listen or settings.share):
        return None
    return lambda user, password: admin_refusal(settings, user, password)


def page_user(request: gr.Request | None) -> str:
    """Who a page request is, for per-user limits and "my jobs": the logged-in user when
    Gradio checked a login, else the client address; on a Space, the Hugging Face user or
    the Gradio session (`frontends/page/identity.py`)."""
    return visitor_key(request)


def follow_job(
    service: GenerationService,
    request: GenerationRequest,
    user: str,
    preview_every: int,
    plan: GridPlan | None = None,
) -> Iterator[str | ProgressSnapshot | GenerationResult | GridOutput | None]:
    """Submit `request` (or, with an X/Y/Z `plan`, its cells as one series job); yield the
    job id, then progress snapshots, then the result or the assembled grid (None when it
    was taken out of the queue before it started)."""
    updates: queue.Queue[ProgressSnapshot] = queue.Queue()
    if plan is not None:
        job = service.submit_series(
            [cell.request for cell in plan.cells],
            label=f"{XYZ_TITLE}: {request.prompt}",
            user=user,
            on_progress=updates.put,
            preview_every=preview_every,
        )
        yield from _follow(
            job,
            updates,
            lambda job: assemble_grid(plan, service.series_result(job)),
            service.progress,
        )
        return
    job = service.submit(request, user=user, on_progress=updates.put, preview_every=preview_every)
    yield from _follow(job, updates, service.result, service.progress)


def follow_series(
    service: GenerationService, requests: list[GenerationRequest], user: str, preview_every: int
) -> Iterator[str | ProgressSnapshot | list[GenerationResult] | None]:
    """`follow_job` for a script's requests run as one job: the last item is the list of
    their results."""
    updates: queue.Queue[ProgressSnapshot] = queue.Queue()
    job = service.submit_series(
        requests,
        label=requests[0].prompt,
        user=user,
        on_progress=updates.put,
        preview_every=preview_every,
    )
    yield from _follow(job, updates, service.series_result, service.progress)


def _follow(
    job: str,
    updates: queue.Queue[ProgressSnapshot],
    result: Callable[[str], Any],
    progress: Callable[[str], ProgressSnapshot],
) -> Iterator[Any]:
    """The job id, its queued (place in the queue) and running snapshots, then
    `result(job)` (None when cancelled)."""
    yield job
    while True:
        snapshot = next_snapshot(updates, job, progress)
        if snapshot.state in FINAL_STATES:
            break
        if snapshot.state in ("queued", "running"):
            yield snapshot
    if snapshot.state == "cancelled":
        yield None
        return
    yield result(job)


def interrupt_jobs(service: GenerationService, job_id: str, user: str) -> str:
    """Interrupt this session's job; with none known (a new tab, or the tab that started
    it was closed), the user's own queued and running jobs."""
    if job_id and service.interrupt(job_id):
        return "Interrupting after the current step"
    mine = [info.job_id for info in service.jobs(user)]
    stopped = sum(service.interrupt(job) for job in mine)
    return f"Interrupting {stopped} job(s) of yours" if stopped else "Nothing of yours is running"


def time_taken(seconds: float) -> str:
    """A1111's "Time taken" line: `1.2 sec.`, `1 min. 3.0 sec.`."""
    minutes, rest = divmod(seconds, 60)
    shown = f"{int(minutes)} min. {rest:.1f} sec." if minutes else f"{rest:.1f} sec."
    return f"Time taken: {shown}"


def joined(before: Shown, after: Shown) -> Shown:
    """Two parts of one job's output as one (the first infotext is the first part's)."""
    gallery, info, seeds, notes, infotexts = before
    more_gallery, more_info, more_seeds, more_notes, more_infotexts = after
    return (
        [*gallery, *more_gallery],
        info or more_info,
        [*seeds, *more_seeds],
        more_notes,  # the whole job's notes come with its result
        [*infotexts, *more_infotexts],
    )


def after_shown(result: GenerationResult, shown: int) -> GenerationResult:
    """The job's result without its first `shown` images (batches already shown and
    saved as they finished)."""
    if not shown:
        return result
    return replace(
        result,
        images=result.images[shown:],
        seeds=result.seeds[shown:],
        infotexts=result.infotexts[shown:],
    )


def timed(shown: Shown, started: float, adjusted: list[str]) -> Shown:
    """`finish`'s output with what the run `adjusted` in the request first and the time
    since `started` as the last note."""
    gallery, info, seeds, notes, infotexts = shown
    notes = [*adjusted, *notes, time_taken(time.perf_counter() - started)]
    return gallery, info, seeds, notes, infotexts


def progress_bar(update: ProgressSnapshot | None, unit: str = "batch") -> str:
    """The page's progress bar (HTML) for a running job's snapshot; a waiting one says
    so (None: submitted, not started yet)."""
    if update is not None and update.state == "queued" and update.queue_position is not None:
        return f'<div class="job-progress"><span>{html.escape(waiting_text(update))}</span></div>'
    if update is None or update.state != "running":
        return '<div class="job-progress"><span>waiting…</span></div>'
    percent = max(0.0, min(100.0, update.fraction * 100))
    return (
        f'<div class="job-progress"><div class="job-progress-bar" style="width: {percent:.1f}%">'
        f"</div><span>{html.escape(step_text(update, unit))} · {percent:.0f}%</span></div>"
    )


def step_text(update: ProgressSnapshot, unit: str = "batch") -> str:
    """The progress text, with the job's own elapsed time (Gradio's clock restarted with
    every preview)."""
    batch = f"{unit} {update.job_no + 1}/{update.job_count}, " if update.job_count > 1 else ""
    elapsed = f", {time.time() - update.started:.0f}s elapsed" if update.started else ""
    return (
        f"{batch}step {update.sampling_step}/{update.sampling_steps}, "
        f"ETA {update.eta_seconds:.0f}s{elapsed}"
    )


def build_prompts(
    defaults: dict[str, Any], prefix: str = "", counters: dict[str, gr.HTML] | None = None
) -> dict[str, Any]:
    """The prompt boxes (`prefix` tells the tabs' elements apart); with `counters`, each
    box gets A1111's token counter under it, put there by field name."""
    made = {
        "prompt": gr.Textbox(
            label="Prompt (Ctrl+Enter generates)",
            lines=3,
            elem_id=f"{prefix}prompt",
            placeholder=field_spec("prompt").help,
        )
    }
    if counters is not None:
        counters["prompt"] = gr.HTML("", elem_id=f"{prefix}prompt_tokens", padding=False)
    made["negative_prompt"] = gr.Textbox(
        value=defaults["negative_prompt"],
        label="Negative prompt",
        lines=2,
        elem_id=f"{prefix}negative_prompt",
    )
    if counters is not None:
        counters["negative_prompt"] = gr.HTML(
            "", elem_id=f"{prefix}negative_prompt_tokens", padding=False
        )
    return made


def wire_token_counters(
    service: GenerationService,
    controls: dict[str, Any],
    counters: dict[str, gr.HTML],
    checkpoint: gr.Dropdown,
    page: gr.Blocks,
) -> None:
    """A1111's `n/75` under each prompt box, kept up to date as the text, the steps (prompt
    editing) or the checkpoint (its embeddings) change."""
    for name, counter in counters.items():

        def count(
            text: str, steps: float, choice: str | None, negative: bool = name != "prompt"
        ) -> str:
            try:
                used, room = service.token_count(
                    text or "", int(steps or 1), negative=negative, checkpoint=choice or None
                )
            except LorastackError:  # a checkpoint gone since: count without its embeddings
                used, room = service.token_count(text or "", int(steps or 1), negative=negative)
            return f'<div class="token-counter">{used}/{room}</div>'

        sources = [controls[name], controls["steps"], checkpoint]
        quiet = {**QUICK, "show_progress": "hidden"}
        controls[name].change(count, sources, counter, **quiet)
        controls["steps"].change(count, sources, counter, **quiet)
        checkpoint.change(count, sources, counter, **quiet)
        page.load(count, sources, counter, **quiet)


def schedule_choices(sampler_name: str | None) -> list[str]:
    """The schedule types the sampler runs with (every one, for a sampler not known)."""
    try:
        return [scheduler_label(name) for name in schedulers_for(sampler_name or "")]
    except LorastackError:
        return list(SCHEDULER_LABELS)


def wire_schedule_choices(sampler: gr.Dropdown, schedule: gr.Dropdown, page: gr.Blocks) -> None:
    """The schedule menu offers only what the chosen sampler can run (A1111's DDIM, PLMS
    and TCD have their own fixed schedule); a schedule the new sampler cannot run becomes
    Automatic, with a word."""

    def offer(chosen: str | None, current: str | None) -> gr.Dropdown:
        choices = schedule_choices(chosen)
        if current in choices:
            return gr.Dropdown(choices=choices)
        if current:
            gr.Info(f"{chosen} runs with its own schedule: {current} became Automatic")
        return gr.Dropdown(choices=choices, value=choices[0])

    sampler.change(offer, [sampler, schedule], schedule, **QUICK)
    page.load(offer, [sampler, schedule], schedule, **QUICK)


def build_parameters(slider: Any, defaults: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The other request fields' components, keyed by schema.FIELDS name."""
    controls: dict[str, Any] = {}
    with gr.Row():
        controls["sampler_name"] = gr.Dropdown(
            list(SAMPLER_NAMES),
            value=defaults["sampler_name"],
            label="Sampling method",
            elem_id=f"{prefix}sampler_name",
        )
        controls["scheduler"] = gr.Dropdown(
            list(SCHEDULER_LABELS),
            value=scheduler_label(defaults["scheduler"]),
            label="Schedule type",
            elem_id=f"{prefix}scheduler",
        )
        controls["steps"] = slider("steps", prefix)
    with gr.Row():
        controls["width"] = slider("width", prefix)
        controls["height"] = slider("height", prefix)
    with gr.Row():
        controls["n_iter"] = slider("n_iter", prefix)
        controls["batch_size"] = slider("batch_size", prefix)
    with gr.Row():
        controls["cfg_scale"] = slider("cfg_scale", prefix)
        seed = field_spec("seed")
        controls["seed"] = gr.Number(
            value=seed.default,
            label=seed.label,
            precision=0,
            elem_id=f"{prefix}seed",
            info=seed.help,
        )
        controls["clip_skip"] = slider("clip_skip", prefix)
        controls["tiling"] = gr.Checkbox(
            False, label="Tiling", elem_id=f"{prefix}tiling", min_width=80
        )
    with gr.Accordion("Extra seed options", open=False, elem_id=f"{prefix}seed_extras"):
        with gr.Row():
            subseed = field_spec("subseed")
            controls["subseed"] = gr.Number(
                value=subseed.default,
                label=subseed.label,
                precision=0,
                elem_id=f"{prefix}subseed",
                info=subseed.help,
            )
            controls["subseed_strength"] = slider("subseed_strength", prefix)
        with gr.Row():
            controls["seed_resize_from_w"] = slider("seed_resize_from_w", prefix)
            controls["seed_resize_from_h"] = slider("seed_resize_from_h", prefix)
        source = field_spec("randn_source")
        controls["randn_source"] = gr.Radio(
            list(RANDN_SOURCES),
            value=source.default,
            label=source.label,
            info=source.help,
            elem_id=f"{prefix}randn_source",
        )
        ensd = field_spec("eta_noise_seed_delta")
        controls["eta_noise_seed_delta"] = gr.Number(
            value=ensd.default,
            label=ensd.label,
            precision=0,
            elem_id=f"{prefix}eta_noise_seed_delta",
            info=ensd.help,
        )
    return controls


def build_results(tab: str, prefix: str, outputs: Path | None = None) -> Results:
    """Generate and Interrupt, the gallery with its parameters, the seed buttons and the
    "Send to" buttons (`tab` names the latter's elements as A1111 does); with `outputs`
    (a local user's server), "Open output folder" for the tab's images there."""
    with gr.Row():
        run = gr.Button("Generate", variant="primary", elem_id=f"{prefix}generate")
        stop = gr.Button("Interrupt", elem_id=f"{prefix}interrupt")
        skip = gr.Button("Skip", elem_id=f"{prefix}skip")
    progress = gr.HTML("", elem_id=f"{prefix}progress", min_height=36, padding=False)
    gallery = gr.Gallery(
        label="Images",
        elem_id=f"{prefix}gallery",
        columns=2,
        format="png",
        interactive=False,
        object_fit="contain",  # each image's real shape, never a square crop
    )
    with gr.Row():
        send_img2img = gr.Button("Send to img2img", size="sm", elem_id=f"{tab}_send_to_img2img")
        send_inpaint = gr.Button("Send to inpaint", size="sm", elem_id=f"{tab}_send_to_inpaint")
        send_extras = gr.Button("Send to extras", size="sm", elem_id=f"{tab}_send_to_extras")
    info = gr.Textbox(label="Parameters", lines=5, elem_id=f"{prefix}infotext", interactive=False)
    seeds = gr.JSON(visible=False, label="seeds")
    notes = gr.Markdown(elem_id=f"{prefix}notes")
    with gr.Row():
        dice = gr.Button("Random seed (-1)", size="sm", elem_id=f"{prefix}random_seed")
        reuse = gr.Button("Reuse last seed", size="sm", elem_id=f"{prefix}reuse_seed")
        if outputs is not None:
            build_open_folder(outputs / f"{tab}-images", f"{prefix}open_folder")
    selected = gr.State(0)
    return Results(
        run,
        stop,
        skip,
        progress,
        gallery,
        selected,
        info,
        seeds,
        notes,
        dice,
        reuse,
        send_img2img,
        send_inpaint,
        send_extras,
    )


def wire_results(
    service: GenerationService,
    results: Results,
    controls: dict[str, Any],
    generate: Callable[..., Iterator[tuple[Any, ...]]],
    inputs: list[Any] | set[Any],
    api_name: str | None,
) -> None:
    """Generate (`generate` streams gallery, infotext, seeds, notes, each image's infotext
    and the job id), Interrupt (this session's job), the seed buttons and the gallery
    selection (it shows the selected image's parameters, as A1111 does).

    The page's Generate keeps a refused run's message in the notes until the next run and
    leaves the previous images and parameters shown (a raised error would cover them with
    "Error" badges); API callers (`api_name`, through a hidden twin button with the same
    inputs) still get the error itself."""
    note_state = gr.State([])
    infotext_state = gr.State([])  # each shown image's infotext, for the gallery selection
    job_state = gr.State("")  # this session's running job, for Interrupt
    outputs = [results.gallery, results.info, results.seeds, note_state, infotext_state]
    outputs.append(job_state)
    if api_name:
        api_twin = gr.Button(visible=False, elem_id=f"{api_name}_api")

        @functools.wraps(generate)  # Gradio reads the signature (gr.Request, gr.Progress)
        def for_clients(*args: Any, **kwargs: Any) -> Iterator[tuple[Any, ...]]:
            for shown in generate(*args, **kwargs):
                if any(value != SKIPPED for value in shown[:-1]):  # not progress alone
                    yield shown[:-1]  # the page's own progress bar is not the API's

        api_twin.click(for_clients, inputs, outputs, api_name=api_name, concurrency_limit=None)

    @functools.wraps(generate)
    def shown_in_page(*args: Any, **kwargs: Any) -> Iterator[tuple[Any, ...]]:
        try:
            yield from generate(*args, **kwargs)
        except gr.Error as error:
            gr.Warning(str(error.message))
            yield *KEEP_SHOWN[:3], [ERROR_NOTE + str(error.message)], gr.skip(), "", ""

    generated = results.run.click(
        shown_in_page,
        inputs,
        [*outputs, results.progress],
        api_visibility="private",
        concurrency_limit=None,
        # the page draws its own bar above the gallery: Gradio's, on the outputs, went
        # away with every preview or batch and restarted its clock
        show_progress="hidden",
    )
    results.run.click(lambda: 0, None, results.selected, **QUICK)
    generated.then(notes_markdown, note_state, results.notes, **QUICK)

    def interrupt(job_id: str, request: gr.Request) -> None:
        gr.Info(interrupt_jobs(service, job_id, page_user(request)))

    results.stop.click(interrupt, job_state, None, queue=False, api_visibility="private")

    def skip(job_id: str) -> None:
        done = bool(job_id) and service.skip(job_id)
        gr.Info("Skipping to the next batch" if done else "Nothing of this page is running")

    results.skip.click(skip, job_state, None, **QUICK)
    results.dice.click(lambda: -1, None, controls["seed"], **QUICK)

    def reuse(used: list[int] | None, infotexts: list[str], index: int) -> Any:
        """The selected image's seed (A1111), else the run's first."""
        if 0 <= index < len(infotexts):
            seed = parse_infotext(infotexts[index]).params.get("Seed", "")
            if seed.lstrip("-").isdigit():
                return int(seed)
        return used[0] if used else gr.skip()

    sources = [results.seeds, infotext_state, results.selected]
    results.reuse.click(reuse, sources, controls["seed"], **QUICK)

    def select(infotexts: list[str], event: gr.SelectData) -> tuple[int, Any]:
        index = event.index
        return index, infotexts[index] if 0 <= index < len(infotexts) else gr.skip()

    results.gallery.select(select, infotext_state, [results.selected, results.info], **QUICK)


def notes_markdown(notes: list[str]) -> str:
    """The notes under the result: ℹ per note, a refused run's message in bold."""
    lines = []
    for note in notes:
        if note.startswith(ERROR_NOTE):
            lines.append(f"**Error:** {html.escape(note.removeprefix(ERROR_NOTE))}")
        else:
            lines.append(f"ℹ {note}")
    return "\n\n".join(lines)


def selected_path(gallery: list | None, index: int) -> str | None:
    """The gallery image the user clicked (the first when none was): its saved file, so
    "Send to" reads its parameters."""
    if not gallery:
        return None
    return gallery[min(index, len(gallery) - 1)][0]
