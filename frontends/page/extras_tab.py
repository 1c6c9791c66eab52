"""The Extras tab, as A1111 1.10's (`modules/ui_postprocessing.py` with the Upscale
postprocessing script's controls): upscale one image, or several uploaded files, by a factor
or to a size, with an optional second upscaler blended in. Every result is saved to
`outputs/extras-images/` keeping the source's A1111 parameters, with the Extras text in a
`postprocessing` chunk. "Send to extras" (txt2img, img2img, PNG Info) fills its single
image. Face restoration is not offered.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from frontends.page.errors import user_error
from frontends.page.gallery_tab import note_owner
from frontends.page.img2img_tab import load_image
from frontends.page.lora_panel import QUICK
from frontends.page.waiting import FINAL_STATES, next_snapshot, waiting_text
from pipelines.errors import InvalidRequestError, LorastackError
from pipelines.extras import RESIZE_MODES, ExtrasRequest, ExtrasResult, extras_png
from pipelines.interface import GenerationService, ProgressSnapshot
from pipelines.output import save_extras_png

SOURCES = ("single", "batch")
"""The image sub-tabs: "Single Image" and "Process Batch" (several uploaded files)."""
SWITCH_SYMBOL = "\u21c5"  # A1111's switch_values_symbol


@dataclass
class ExtrasPanel:
    """The tab's inputs (`values`, read by `extras_request`) and what "Send to extras"
    fills: the single image, its sub-tab and the page's tabs."""

    tabs: gr.Tabs  # the page's tabs, to switch to Extras
    subtabs: gr.Tabs
    source: gr.Textbox  # hidden: the selected image sub-tab's SOURCES name
    image: gr.Image
    gallery: gr.Gallery
    info: gr.Textbox
    values: dict[str, Any]

    def wire_send(
        self, button: gr.Button, sources: list[Any], path_of: Callable[..., str | None]
    ) -> None:
        """`button` puts the image `path_of(*sources values)` into the single image and
        opens the Extras tab."""

        def send(*values: Any) -> tuple[Any, ...]:
            path = path_of(*values)
            if not path:
                raise user_error("No image to send: generate or drop one first")
            return (
                path,
                SOURCES[0],
                gr.Tabs(selected="extras_single"),
                gr.Tabs(selected="extras"),
            )

        button.click(send, sources, [self.image, self.source, self.subtabs, self.tabs], **QUICK)


def build_extras_tab(
    service: GenerationService,
    outputs_dir: Path,
    page: gr.Blocks,
    tabs: gr.Tabs,
    user_of: Callable[[gr.Request | None], str],
    owner_of: Callable[[gr.Request | None], str | None] = lambda _: None,
) -> ExtrasPanel:
    """The tab's inputs (A1111's labels and page defaults), Generate and Stop, the gallery
    and the postprocessing text. `user_of` says who a page request is (per-user limits,
    Stop acts on the user's own job), `owner_of` who owns its saved images (None: no one
    in particular); upscaler choices are refreshed on page load."""
    source = gr.Textbox(SOURCES[0], visible=False, elem_id="extras_source")
    resize_mode = gr.Textbox(RESIZE_MODES[0], visible=False, elem_id="extras_resize_mode")
    values: dict[str, Any] = {"source": source, "resize_mode": resize_mode}
    with gr.Row(equal_height=False):
        with gr.Column():
            with gr.Tabs(elem_id="mode_extras") as subtabs:
                with gr.Tab("Single Image", id="extras_single", elem_id="extras_single_tab") as one:
                    image = gr.Image(
                        label="Source",
                        type="filepath",
                        image_mode=None,  # the file as uploaded: its parameters are kept
                        sources=["upload", "clipboard"],
                        elem_id="extras_image",
                    )
                with gr.Tab(
                    "Process Batch", id="extras_batch", elem_id="extras_batch_process_tab"
                ) as many:
                    values["batch"] = gr.Files(
                        label="Batch Process",
                        file_types=["image"],
                        type="filepath",
                        elem_id="extras_image_batch",
                    )
            values["image"] = image
            values.update(_upscale_controls(service, page, resize_mode))
        with gr.Column():
            with gr.Row():
                run = gr.Button("Generate", variant="primary", elem_id="extras_generate")
                stop = gr.Button("Stop", elem_id="extras_interrupt")
            gallery = gr.Gallery(
                label="Images",
                elem_id="extras_gallery",
                columns=2,
                format="png",
                interactive=False,
            )
            info = gr.Textbox(
                label="Postprocessing", lines=2, interactive=False, elem_id="extras_infotext"
            )
    for name, tab in zip(SOURCES, (one, many), strict=True):
        tab.select(None, None, source, js=f"() => '{name}'", **QUICK)

    job_state = gr.State("")  # this session's Extras job, for Stop

    def extras(
        data: dict[Any, Any],
        request: gr.Request,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio injects it
    ) -> Iterator[tuple[Any, ...]]:
        """Run the tab's request through the service's queue; stream progress; save and
        show every result. User errors show on the page."""
        given = {name: data[component] for name, component in values.items()}
        user, owner = user_of(request), owner_of(request)
        yield from run_extras_page(service, outputs_dir, given, user, progress, owner)

    run.click(
        extras,
        set(values.values()),
        [gallery, info, job_state],
        api_visibility="private",
        concurrency_limit=None,  # the service's job queue decides the order
    )

    def interrupt(job_id: str, request: gr.Request) -> None:
        gr.Info(stop_extras(service, job_id, user_of(request)))

    stop.click(interrupt, job_state, None, queue=False, api_visibility="private")
    return ExtrasPanel(tabs, subtabs, source, image, gallery, info, values)


def _upscale_controls(
    service: GenerationService, page: gr.Blocks, resize_mode: gr.Textbox
) -> dict[str, Any]:
    """A1111's Upscale script: two upscalers, the second's visibility, and the "Scale by"
    and "Scale to" sub-tabs (the selected one is `resize_mode`)."""
    names = service.upscaler_names()
    values: dict[str, Any] = {}
    values["upscaler_1"] = gr.Dropdown(
        names, value=names[0], label="Upscaler 1", elem_id="extras_upscaler_1"
    )
    with gr.Row():
        values["upscaler_2"] = gr.Dropdown(
            names, value=names[0], label="Upscaler 2", elem_id="extras_upscaler_2"
        )
        values["upscaler_2_visibility"] = gr.Slider(
            0.0,
            1.0,
            value=0.0,
            step=0.001,
            label="Upscaler 2 visibility",
            elem_id="extras_upscaler_2_visibility",
        )
    with gr.Tabs(elem_id="extras_resize_mode_tabs"):
        with gr.Tab("Scale by", elem_id="extras_scale_by_tab") as scale_by, gr.Row():
            values["upscaling_resize"] = gr.Slider(
                1.0,
                8.0,
                value=4,
                step=0.05,
                label="Resize",
                elem_id="extras_upscaling_resize",
                scale=4,
            )
            values["max_side_length"] = gr.Number(
                value=0,
                label="Max side length",
                info="A larger side is scaled down to it (aspect kept). 0 = no limit.",
                minimum=0,
                step=8,
                precision=0,
                elem_id="extras_upscale_max_side_length",
                min_width=160,
                scale=1,
            )
        with gr.Tab("Scale to", elem_id="extras_scale_to_tab") as scale_to, gr.Row():
            with gr.Column(scale=4):
                values["upscaling_resize_w"] = gr.Slider(
                    64, 8192, value=512, step=8, label="Width", elem_id="extras_upscaling_resize_w"
                )
                values["upscaling_resize_h"] = gr.Slider(
                    64, 8192, value=512, step=8, label="Height", elem_id="extras_upscaling_resize_h"
                )
            with gr.Column(scale=1, min_width=120):
                switch = gr.Button(
                    SWITCH_SYMBOL, size="sm", elem_id="extras_upscaling_res_switch_btn"
                )
                values["upscaling_crop"] = gr.Checkbox(
                    True, label="Crop to fit", elem_id="extras_upscaling_crop"
                )
    for name, tab in zip(RESIZE_MODES, (scale_by, scale_to), strict=True):
        tab.select(None, None, resize_mode, js=f"() => '{name}'", **QUICK)
    size = [values["upscaling_resize_w"], values["upscaling_resize_h"]]
    switch.click(lambda w, h: (h, w), size, size, **QUICK)

    def refresh() -> tuple[gr.Dropdown, gr.Dropdown]:
        listed = service.upscaler_names()
        return gr.Dropdown(choices=listed), gr.Dropdown(choices=listed)

    page.load(refresh, None, [values["upscaler_1"], values["upscaler_2"]], **QUICK)
    return values


def extras_request(values: dict[str, Any]) -> ExtrasRequest:
    """The ExtrasRequest for the tab's values (named as in `ExtrasPanel.values`); raises
    InvalidRequestError saying what is missing."""
    if values["source"] == "batch":
        paths = [str(path) for path in values["batch"] or []]
        if not paths:
            raise InvalidRequestError("Extras: upload images to process first", field="image")
        images = tuple(load_image(path, "image", "") for path in paths)
    else:
        images = (load_image(values["image"], "image", "Extras: upload an image first"),)
    mode = values["resize_mode"]
    scale = float(values["upscaling_resize"])
    return ExtrasRequest(
        images=images,
        resize_mode=RESIZE_MODES.index(mode) if mode in RESIZE_MODES else 0,
        # a whole number as the slider sends it: A1111's page writes "upscale by: 2"
        upscaling_resize=int(scale) if scale.is_integer() else scale,
        max_side_length=int(values["max_side_length"] or 0),
        upscaling_resize_w=int(values["upscaling_resize_w"]),
        upscaling_resize_h=int(values["upscaling_resize_h"]),
        upscaling_crop=bool(values["upscaling_crop"]),
        upscaler_1=values["upscaler_1"] or "None",
        upscaler_2=values["upscaler_2"] or "None",
        upscaler_2_visibility=float(values["upscaler_2_visibility"]),
    )


def save_results(outputs_dir: Path, result: ExtrasResult) -> list[Path]:
    """Save every result as A1111 does (the source's `parameters` kept, the Extras text in
    a `postprocessing` chunk) to `outputs/extras-images/YYYY-MM-DD/NNNNN.png`."""
    return [
        save_extras_png(outputs_dir, extras_png(image, parameters, text))
        for image, parameters, text in zip(
            result.images, result.parameters, result.infotexts, strict=True
        )
    ]


def follow_extras(
    service: GenerationService, request: ExtrasRequest, user: str
) -> Iterator[str | ProgressSnapshot | ExtrasResult | None]:
    """Queue `request`; yield its job id, its queued (place in the queue, asked of the
    service when no update comes) and running snapshots, then the result (None when it was
    taken out of the queue before it started). Its error is raised here."""
    updates: queue.Queue[ProgressSnapshot] = queue.Queue()
    job_id = service.submit_extras(request, user=user, on_progress=updates.put)
    yield job_id
    while (snapshot := next_snapshot(updates, job_id, service.progress)).state not in FINAL_STATES:
        if snapshot.state in ("queued", "running"):
            yield snapshot
    yield None if snapshot.state == "cancelled" else service.extras_result(job_id)


def run_extras_page(
    service: GenerationService,
    outputs_dir: Path,
    values: dict[str, Any],
    user: str,
    progress: Callable[..., Any] = lambda *_, **__: None,
    owner: str | None = None,
) -> Iterator[tuple[Any, ...]]:
    """The Generate event: yields (gallery, postprocessing text, job id) updates; a
    LorastackError becomes a gr.Error with its message. The saved images are `owner`'s in
    the gallery (on a shared server)."""
    try:
        request = extras_request(values)
        for item in follow_extras(service, request, user):
            if isinstance(item, str):
                yield gr.skip(), gr.skip(), item
            elif isinstance(item, ProgressSnapshot):
                if item.state == "queued" and item.queue_position:
                    progress(0.0, desc=waiting_text(item))
                elif item.state == "running":
                    done, count = item.sampling_step, item.sampling_steps
                    progress(item.fraction, desc=f"image {done}/{count}")
            elif item is None:
                gr.Info("Stopped before it started")
                yield [], "", ""
            else:
                paths = save_results(outputs_dir, item)
                for path in paths:
                    note_owner(service, path, owner)
                if item.interrupted:
                    gr.Info(f"Stopped: {len(paths)} of {len(request.images)} image(s) finished")
                # as A1111, the text of the last image (all share their settings)
                yield [str(path) for path in paths], item.infotexts[-1] if paths else "", ""
    except LorastackError as error:
        raise user_error(error.message) from error


def stop_extras(service: GenerationService, job_id: str, user: str) -> str:
    """Stop this session's Extras job; with none known (a new tab), the user's own
    queued and running Extras jobs."""
    if job_id and service.interrupt(job_id):
        return "Stopping after the current image"
    mine = [info.job_id for info in service.jobs(user) if info.kind == "extras"]
    stopped = sum(service.interrupt(job) for job in mine)
    if not stopped:
        return "Nothing of yours is running"
    return f"Stopping {stopped} Extras job(s) of yours"
