"""The command line: `python -m frontends.cli COMMAND` (generate, extras, list-models,
list-loras, list-upscalers, list-vaes, list-embeddings, list-styles).

A third front end over the same generation service: it builds the same GenerationRequest as the UI
and the API (its generation flags come from `schema.FIELDS`), so the same request, model
and `--threads` give the same pixels. Scripts can rely on the exit codes:

    0  success
    1  anything else (busy, out of memory, I/O error)
    2  bad arguments or an invalid request (wrong value, unknown sampler, ...)
    3  not found (unknown checkpoint or LoRA name)
    4  unusable file (corrupt, unsafe, incompatible or ambiguous)

Errors are one line on stderr; images and listings go to stdout.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipelines.errors import InvalidRequestError, LorastackError, NotFoundError, UnusableFileError
from pipelines.prompt import extract_lora_tags
from pipelines.schema import FIELDS, LoraSpec

EXIT_OK, EXIT_OTHER, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_UNUSABLE = 0, 1, 2, 3, 4

FLAG_NAMES = {"sampler_name": ("--sampler", "--sampler-name")}
"""Request fields whose flag differs from the field name (A1111's CLI-ish names)."""

SETTINGS_FLAGS = (
    "data_dir",
    "ckpt_dir",
    "lora_dir",
    "threads",
    "device",
    "max_pixels",
    "vae_dir",
    "embeddings_dir",
    "controlnet_dir",
    *(f"{kind}_models_path" for kind in ("esrgan", "realesrgan", "swinir", "dat")),
)
"""Launch settings the CLI shares with the server (same flags, same LORASTACK_* env)."""


def parse_lora(text: str) -> LoraSpec:
    """`NAME`, `NAME:W` or `NAME:TE:UNET` (A1111's tag order: text encoder first), or
    anything a `<lora:...>` tag holds: keyframes (`ink:0@0,1@1`), `key=value` items
    (`ink:1:lbw=INALL`, `ink:0.8:in=0:out=1`, `ink:1:hr=0.5`).

    Example: `parse_lora("ink:0.8")` -> `LoraSpec("ink", 0.8)`.
    """
    if "=" in text or "@" in text:
        try:
            specs = extract_lora_tags(f"<lora:{text}>")[1]
        except LorastackError as error:
            raise argparse.ArgumentTypeError(f"--lora {text!r}: {error.message}") from None
        if len(specs) == 1:
            return specs[0]
        raise argparse.ArgumentTypeError(f"--lora {text!r}: expected NAME[:WEIGHT][:KEY=VALUE]")
    parts = text.split(":")
    numbers: list[float] = []
    while len(parts) > 1 and len(numbers) < 2:
        try:
            numbers.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    name = ":".join(parts).strip()
    if not name:
        raise argparse.ArgumentTypeError(f"--lora {text!r}: expected NAME[:WEIGHT]")
    if not numbers:
        return LoraSpec(name)
    if len(numbers) == 1:
        return LoraSpec(name, numbers[0])
    return LoraSpec(name, numbers[1], numbers[0])


_UNIT_IMAGES = ("image", "mask")
_UNIT_INTS = ("processor_res",)
_UNIT_FLOATS = ("weight", "threshold_a", "threshold_b", "guidance_start", "guidance_end")
_UNIT_FLAGS = ("pixel_perfect", "save_detected_map", "inpaint_crop_input_image")


def parse_controlnet(text: str) -> Any:
    """A ControlNet unit as `key=value` pairs with the API's field names, comma-separated:
    `model=control_v11p_sd15_canny,module=canny,image=edges.png,weight=0.8`.

    Example: `parse_controlnet("model=cn,image=a.png").weight` -> 1.0.
    """
    from dataclasses import fields

    from pipelines.images import open_image
    from pipelines.schema import ControlNetUnit

    known = [f.name for f in fields(ControlNetUnit)]
    values: dict[str, Any] = {}
    for item in (part.strip() for part in text.split(",")):
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or key not in known:
            raise argparse.ArgumentTypeError(
                f"--controlnet {text!r}: {item!r} is not KEY=VALUE with a key among "
                f"{', '.join(known)}"
            )
        try:
            if key in _UNIT_IMAGES:
                image = open_image(Path(raw), field=f"--controlnet {key}")
                image.load()
                values[key] = image
            elif key in _UNIT_INTS:
                values[key] = int(raw)
            elif key in _UNIT_FLOATS:
                values[key] = float(raw)
            elif key in _UNIT_FLAGS:
                if raw.lower() not in ("true", "false"):
                    raise ValueError(raw)
                values[key] = raw.lower() == "true"
            else:
                values[key] = raw
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--controlnet {key}={raw!r}: not a valid value for {key}"
            ) from None
        except LorastackError as error:
            raise argparse.ArgumentTypeError(f"--controlnet {key}: {error.message}") from None
    return ControlNetUnit(**values)


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """The server's folder/thread flags, taken from its parser so they are declared once."""
    from pipelines.settings import build_parser

    for action in build_parser()._actions:
        if action.dest in SETTINGS_FLAGS:
            parser._add_action(action)


def _add_img2img_flags(parser: argparse.ArgumentParser) -> None:
    """img2img, inpainting and outpainting (A1111's field names as flags)."""
    from pipelines.imageops import MASKED_CONTENT, RESIZE_MODES
    from pipelines.schema import OUTPAINT_DIRECTIONS, OUTPAINT_METHODS

    group = parser.add_argument_group(
        "img2img", "with --init-image the run is img2img; width and height default to the image's"
    )
    group.add_argument(
        "--init-image",
        action="append",
        type=Path,
        default=[],
        metavar="PNG",
        help="init image (repeatable: up to --batch-size images, one batch)",
    )
    group.add_argument("--mask", type=Path, help="inpainting mask: white is repainted")
    group.add_argument(
        "--resize-mode",
        type=int,
        default=0,
        choices=range(4),
        help="; ".join(f"{i} {label}" for i, label in enumerate(RESIZE_MODES)),
    )
    group.add_argument("--mask-blur", type=int, default=4, help="mask blur in pixels (4)")
    group.add_argument(
        "--inpainting-fill",
        type=int,
        default=1,
        choices=range(4),
        help="masked content: " + "; ".join(f"{i} {t}" for i, t in enumerate(MASKED_CONTENT)),
    )
    group.add_argument(
        "--only-masked",
        action="store_true",
        help='inpaint area "only masked": crop the masked region, generate, paste back',
    )
    group.add_argument("--only-masked-padding", type=int, default=32, help="pixels (32)")
    group.add_argument(
        "--inpaint-not-masked", action="store_true", help="invert the mask (A1111's mask mode)"
    )
    group.add_argument("--initial-noise-multiplier", type=float, default=1.0, help="0..1.5 (1.0)")
    group.add_argument(
        "--img2img-fix-steps",
        action="store_true",
        help="run exactly --steps steps whatever the denoising strength (A1111's option)",
    )
    group.add_argument("--outpaint", type=int, metavar="PIXELS", help="extend the canvas")
    group.add_argument(
        "--outpaint-direction",
        action="append",
        choices=OUTPAINT_DIRECTIONS,
        default=[],
        help="repeatable; default: all four",
    )
    group.add_argument("--outpaint-method", choices=OUTPAINT_METHODS, default=OUTPAINT_METHODS[1])


def _add_hires_flags(parser: argparse.ArgumentParser) -> None:
    """txt2img's hires fix (A1111's API field names as flags)."""
    group = parser.add_argument_group(
        "hires fix", "with --enable-hr a second pass on the upscaled first (txt2img only)"
    )
    group.add_argument("--enable-hr", action="store_true", help="run the hires fix")
    group.add_argument("--hr-scale", type=float, default=2.0, help="upscale by (2.0)")
    group.add_argument("--hr-resize-x", type=int, default=0, help="resize width to (0: scale)")
    group.add_argument("--hr-resize-y", type=int, default=0, help="resize height to (0: scale)")
    group.add_argument(
        "--hr-upscaler", default="Latent", help="a latent mode, None, Lanczos, Nearest or a model"
    )
    group.add_argument("--hr-second-pass-steps", type=int, default=0, help="0: same as --steps")
    group.add_argument("--hr-sampler", help="second pass sampler (default: the same)")
    group.add_argument("--hr-scheduler", help="second pass scheduler (default: the same)")
    group.add_argument("--hr-prompt", default="", help="second pass prompt (default: the same)")
    group.add_argument("--hr-negative-prompt", default="", help="(default: the same)")


def _add_xyz_flags(parser: argparse.ArgumentParser) -> None:
    """A1111's X/Y/Z plot script: an axis is TYPE=VALUES (TYPE an axis label or A1111's
    index)."""
    group = parser.add_argument_group(
        "X/Y/Z plot",
        "a grid over up to three axes, e.g. --xyz-x 'LoRA weight=ink: 0-1 [5]' "
        "--xyz-y 'Seed=1-4'; values as A1111's (lists, 1-5, 1-5 (+2), 0.2-1 [5])",
    )
    for axis in "xyz":
        group.add_argument(f"--xyz-{axis}", metavar="TYPE=VALUES", help=f"the {axis.upper()} axis")
    group.add_argument("--xyz-no-legend", action="store_true", help="no labels on the grid")
    group.add_argument("--xyz-margin", type=int, default=0, help="pixels between cells (0)")
    group.add_argument(
        "--xyz-cells", action="store_true", help="also write every cell's image (sub images)"
    )
    group.add_argument(
        "--xyz-vary-seeds",
        default="",
        metavar="AXES",
        help="e.g. xy: the seed grows along those axes (A1111's Vary seeds)",
    )
    group.add_argument("--xyz-keep-random-seeds", action="store_true", help="keep -1 per cell")


def _xyz(args: argparse.Namespace) -> Any:
    """The XyzPlot the flags ask for (None without any --xyz-x/-y/-z)."""
    from pipelines.xyz import AxisSpec, XyzPlot

    specs = []
    for axis in "xyz":
        text = getattr(args, f"xyz_{axis}")
        if text is None:
            specs.append(AxisSpec())
            continue
        kind, equals, values = text.partition("=")
        if not equals or not kind.strip():
            raise InvalidRequestError(
                f"--xyz-{axis} takes TYPE=VALUES, e.g. 'Steps=10,20', got {text!r}",
                field=f"xyz_{axis}",
            )
        name = kind.strip()
        specs.append(AxisSpec(int(name) if name.isdigit() else name, values.strip()))
    if all(spec.type == "Nothing" for spec in specs):
        return None
    vary = args.xyz_vary_seeds.lower()
    return XyzPlot(
        *specs,
        draw_legend=not args.xyz_no_legend,
        include_lone_images=args.xyz_cells,
        no_fixed_seeds=args.xyz_keep_random_seeds,
        vary_seeds_x="x" in vary,
        vary_seeds_y="y" in vary,
        vary_seeds_z="z" in vary,
        margin_size=args.xyz_margin,
    )


def _hires(args: argparse.Namespace) -> Any:
    """HiresFix from the hires flags (None without --enable-hr)."""
    from pipelines.schema import HiresFix

    if not args.enable_hr:
        return None
    return HiresFix(
        scale=args.hr_scale,
        resize_x=args.hr_resize_x,
        resize_y=args.hr_resize_y,
        upscaler=args.hr_upscaler,
        second_pass_steps=args.hr_second_pass_steps,
        sampler_name=args.hr_sampler,
        scheduler=args.hr_scheduler,
        prompt=args.hr_prompt,
        negative_prompt=args.hr_negative_prompt,
    )


def _image_inputs(args: argparse.Namespace) -> Any:
    """ImageInputs from the img2img flags (None without --init-image)."""
    from pipelines.images import open_image
    from pipelines.schema import OUTPAINT_DIRECTIONS, ImageInputs, Outpaint

    def read(path: Path, flag: str) -> Any:
        image = open_image(path, field=flag)
        image.load()
        return image

    if not args.init_image:
        if args.mask is not None or args.outpaint is not None:
            raise InvalidRequestError(
                "--mask and --outpaint need --init-image", field="init_images"
            )
        return None
    outpaint = None
    if args.outpaint is not None:
        directions = tuple(args.outpaint_direction) or OUTPAINT_DIRECTIONS
        outpaint = Outpaint(args.outpaint, directions, args.outpaint_method)
    return ImageInputs(
        images=tuple(read(path, "--init-image") for path in args.init_image),
        mask=read(args.mask, "--mask") if args.mask is not None else None,
        resize_mode=args.resize_mode,
        mask_blur_x=args.mask_blur,
        mask_blur_y=args.mask_blur,
        inpainting_fill=args.inpainting_fill,
        inpaint_full_res=args.only_masked,
        inpaint_full_res_padding=args.only_masked_padding,
        inpainting_mask_invert=args.inpaint_not_masked,
        initial_noise_multiplier=args.initial_noise_multiplier,
        fix_steps=args.img2img_fix_steps,
        outpaint=outpaint,
    )


def _add_prompts_file_flags(parser: argparse.ArgumentParser) -> None:
    """A1111's "Prompts from file or textbox" script."""
    group = parser.add_argument_group(
        "prompts from file",
        'one request per line: a prompt, or A1111\'s options (--prompt "a dog" --steps 3 '
        "--seed 7 ...); the other flags are every line's defaults",
    )
    group.add_argument("--prompts-file", type=Path, metavar="FILE", help="the lines ('-': stdin)")
    group.add_argument(
        "--iterate-seed", action="store_true", help="each line's seed follows the previous one's"
    )
    group.add_argument(
        "--same-seed", action="store_true", help="draw a -1 seed once, for all lines"
    )
    group.add_argument(
        "--prompt-position",
        choices=("start", "end"),
        default="start",
        help="a line's prompt goes before (start) or after (end) --prompt",
    )


def _line_requests(args: argparse.Namespace, base: Any, bounds: Any) -> list[Any]:
    """The request of each line of --prompts-file, checked (or just `base` without it)."""
    from pipelines.prompts_from_file import PromptsScript, line_requests

    if args.prompts_file is None:
        if args.iterate_seed or args.same_seed:
            raise InvalidRequestError("--iterate-seed and --same-seed need --prompts-file")
        return [base.validated(bounds)]
    if str(args.prompts_file) == "-":
        text = sys.stdin.read()
    else:
        text = args.prompts_file.read_text(encoding="utf-8", errors="ignore")
    script = PromptsScript(args.iterate_seed, args.same_seed, args.prompt_position, text)
    requests = line_requests(base, script)
    for request in requests:
        request.validated(bounds)
    return requests


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m frontends.cli",
        description="lorastack from the command line",
        epilog="exit codes: 0 ok, 1 other error, 2 bad arguments or request, "
        "3 not found, 4 unusable file",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="make images; PNGs carry their parameters")
    for spec in FIELDS:
        flags = FLAG_NAMES.get(spec.name, ("--" + spec.name.replace("_", "-"),))
        if spec.kind is bool:
            generate.add_argument(*flags, dest=spec.name, action="store_true", help=spec.help)
            continue
        limits = (
            f" ({spec.kind(spec.minimum)}..{spec.kind(spec.maximum)})"
            if spec.minimum is not None and spec.maximum is not None
            else ""
        )
        generate.add_argument(
            *flags,
            dest=spec.name,
            type=spec.kind,
            # width/height: None until known, so img2img can take the init image's
            default=None if spec.name in ("width", "height") else spec.default,
            help=f"{spec.label}{limits}; default {spec.default!r}. {spec.help}".strip(),
        )
    generate.add_argument(
        "--lora",
        action="append",
        type=parse_lora,
        default=[],
        metavar="NAME[:W]",
        help="apply a LoRA (repeatable); NAME:TE:UNET sets the two weights separately; "
        "anything a <lora:...> tag takes works too (NAME:0@0,1@1, NAME:1:lbw=INALL)",
    )
    generate.add_argument(
        "--style",
        action="append",
        default=[],
        metavar="NAME",
        help="apply a prompt style from <data-dir>/styles.csv (repeatable, in order)",
    )
    _add_img2img_flags(generate)
    _add_hires_flags(generate)
    _add_xyz_flags(generate)
    _add_prompts_file_flags(generate)
    generate.add_argument("--ckpt", help="checkpoint: listed name, path, or Hub repo id")
    generate.add_argument(
        "--vae",
        default="Automatic",
        help="A1111's SD VAE: Automatic (NAME.vae.* beside the checkpoint, else its own), "
        "None (the checkpoint's own) or a listed VAE (see list-vaes)",
    )
    generate.add_argument(
        "--refiner",
        metavar="NAME",
        help="refiner checkpoint (a listed name of the same family): sampling switches to it "
        "at --refiner-switch-at",
    )
    generate.add_argument(
        "--out", type=Path, help="folder for the images (default: <data-dir>/outputs/...)"
    )
    generate.add_argument(
        "--samples-format",
        help="png, jpg or webp (A1111's samples_format; default: the server's, png)",
    )
    generate.add_argument(
        "--filename-pattern",
        help="A1111's samples_filename_pattern, e.g. '[seed]-[prompt_words]' (NNNNN- comes first)",
    )
    generate.add_argument("--jpeg-quality", type=int, help="1-100, for jpg and webp (80)")
    generate.add_argument(
        "--controlnet",
        action="append",
        type=parse_controlnet,
        default=[],
        metavar="KEY=VALUE,...",
        help="a ControlNet or IP-Adapter unit with the API's field names, e.g. "
        "model=NAME,module=canny,image=PATH,weight=0.8 (repeatable)",
    )
    _add_settings_flags(generate)

    extras = commands.add_parser("extras", help="upscale images as A1111's Extras tab does")
    extras.add_argument(
        "--image", action="append", type=Path, required=True, help="input image (repeatable)"
    )
    extras.add_argument("--upscaler", default="Lanczos", help="upscaler 1 (Lanczos)")
    extras.add_argument("--scale", type=float, default=2.0, help="scale by (2.0)")
    extras.add_argument("--max-side-length", type=int, default=0, help="0: no limit")
    extras.add_argument("--width", type=int, help="scale to this width (with --height)")
    extras.add_argument("--height", type=int, help="scale to this height (with --width)")
    extras.add_argument("--no-crop", action="store_true", help="scale to: do not crop to fit")
    extras.add_argument("--upscaler-2", default="None", help="a second upscaler blended in")
    extras.add_argument("--upscaler-2-visibility", type=float, default=0.0, help="0..1")
    extras.add_argument("--out", type=Path, help="folder (default: <data-dir>/outputs/...)")
    _add_settings_flags(extras)

    for name, what in (
        ("list-models", "checkpoints"),
        ("list-loras", "LoRAs"),
        ("list-upscalers", "model upscalers"),
        ("list-vaes", "VAEs"),
        ("list-embeddings", "textual-inversion embeddings"),
        ("list-styles", "prompt styles of <data-dir>/styles.csv"),
    ):
        listing = commands.add_parser(name, help=f"list the {what} (tab-separated)")
        _add_settings_flags(listing)
    return parser


def _settings(args: argparse.Namespace) -> Any:
    """Settings through the server's own parser, so env vars and defaults agree."""
    from pipelines.settings import parse_settings

    argv: list[str] = []
    for dest in SETTINGS_FLAGS:
        value = getattr(args, dest, None)
        flag = "--" + dest.replace("_", "-")
        for item in value if isinstance(value, list) else [value]:
            if item is not None:
                argv += [flag, str(item)]
    return parse_settings(argv)


def _service(args: argparse.Namespace, ckpt: str | None = None) -> tuple[Any, Any]:
    """The wiring, as app.py does it: folders, start-up checkpoint, the local service."""
    from deployments.hub import resolve_startup_checkpoint
    from pipelines.service import build_folders, build_service
    from pipelines.settings import apply_threads

    settings = _settings(args)
    apply_threads(settings)
    folders = build_folders(settings)
    service = build_service(settings, folders=folders)
    service.startup_checkpoint = resolve_startup_checkpoint(ckpt, folders, settings.models_dirs[0])
    return service, folders


def _generate(args: argparse.Namespace) -> int:
    from pipelines.schema import GenerationRequest

    settings = _settings(args)
    values = {spec.name: getattr(args, spec.name) for spec in FIELDS}
    inputs = _image_inputs(args)
    if inputs is not None:
        first = inputs.images[0]
        size = first.size
        if inputs.outpaint is not None:
            from pipelines.outpainting import outpaint_size

            size = outpaint_size(*first.size, inputs.outpaint)
        for index, name in enumerate(("width", "height")):
            if values[name] is None or inputs.outpaint is not None:
                values[name] = size[index]
    for name in ("width", "height"):
        if values[name] is None:
            values[name] = next(spec.default for spec in FIELDS if spec.name == name)
    hires = _hires(args)
    if hires is not None and inputs is not None:
        raise InvalidRequestError("--enable-hr is for txt2img; it cannot be used with --init-image")
    request = GenerationRequest(
        **values,
        loras=tuple(args.lora),
        img2img=inputs,
        hires=hires,
        styles=tuple(args.style),
        vae=args.vae,
        refiner_checkpoint=args.refiner,
        controlnet=tuple(args.controlnet),
    )
    _style_store(settings).resolve(request.styles)  # unknown styles fail before loading
    # fail on bad values before loading anything
    requests = _line_requests(args, request, settings.bounds)
    plot, plan = _xyz(args), None
    if plot is not None:
        from pipelines.xyz import plan_grid

        if args.prompts_file is not None:
            raise InvalidRequestError("--xyz-* and --prompts-file are two scripts: use one")
        plan = plan_grid(request, plot, settings.bounds)
        requests = [cell.request for cell in plan.cells]
    from tqdm import tqdm

    from pipelines.output import batch_number, save_image

    service, folders = _service(args, args.ckpt)
    saving = replace(
        service.save_options,
        **{
            name: value
            for name, value in (
                ("samples_format", args.samples_format),
                ("filename_pattern", args.filename_pattern),
                ("jpeg_quality", args.jpeg_quality),
            )
            if value is not None
        },
    ).checked()
    folders.hash_missing()  # a one-shot run waits for its hashes: its infotexts name them
    service.select_checkpoint(service.startup_checkpoint)
    total = sum(item.n_iter * item.steps for item in requests)
    with tqdm(total=total, unit="step", file=sys.stderr, disable=None) as bar:

        def on_step(progress: Any) -> None:
            done = progress.job_no * progress.sampling_steps + progress.sampling_step
            bar.update(max(0, min(total, done) - bar.n))

        grids = 0
        if plan is not None:
            from pipelines.xyz import assemble_grid

            cells = service.series(
                requests, label=f"X/Y/Z plot: {request.prompt}", on_progress=on_step
            )
            output = assemble_grid(plan, cells)
            results, grids = [output.as_result(request)], output.grids
            stopped = output.interrupted
            # the cells without --xyz-cells: written too, each with its own parameters
            results.append(replace(results[0], images=[], seeds=[], infotexts=[], notes=[]))
            for image, infotext, seed in output.unshown:
                results[1].images.append(image)
                results[1].infotexts.append(infotext)
                results[1].seeds.append(seed)
        elif args.prompts_file is None:
            results = [service.generate(request, on_progress=on_step)]
            stopped = results[0].interrupted
        else:
            label = f"prompts from {args.prompts_file}"
            results = service.series(requests, label=label, on_progress=on_step)
            stopped = any(r.interrupted for r in results) or len(results) < len(requests)
    for result in results:
        for note in result.notes:
            print(f"note: {note}", file=sys.stderr)
        for index, (image, seed, infotext) in enumerate(
            zip(result.images, result.seeds, result.infotexts, strict=True)
        ):
            grid = result is results[0] and index < grids
            kind = f"{request.kind}-grids" if grid else f"{request.kind}-images"
            path = save_image(
                settings.outputs_dir,
                image,
                infotext,
                seed,
                kind=kind,
                options=saving,
                batch_number=None if grid else batch_number(index, result.request.batch_size),
                folder=args.out,
            )
            print(path)
    if stopped:
        print("interrupted: fewer images than asked for", file=sys.stderr)
    return EXIT_OK


def _list_models(args: argparse.Namespace) -> int:
    service, folders = _service(args)
    folders.hash_missing()
    print("title\tarchitecture\tkind\tsha256\tproblem")
    for entry in service.checkpoints():
        architecture = entry.architecture.value if entry.architecture else "?"
        fields = (entry.title, architecture, entry.kind, entry.sha256 or "", entry.error or "")
        print("\t".join(fields))
    return EXIT_OK


def _list_loras(args: argparse.Namespace) -> int:
    service, folders = _service(args)
    folders.hash_missing()
    print("name\talias\tarchitecture\thash\ttrigger words\tproblem")
    for entry in service.loras():
        words = ", ".join(entry.trigger_words)
        fields = (
            entry.name,
            entry.alias,
            entry.architecture or "?",
            entry.short_hash or "",
            words,
            entry.error or "",
        )
        print("\t".join(fields))
    return EXIT_OK


def _extras(args: argparse.Namespace) -> int:
    from pipelines.extras import ExtrasRequest, extras_png
    from pipelines.images import open_image
    from pipelines.output import save_extras_png, write_new_file

    if (args.width is None) != (args.height is None):
        raise InvalidRequestError("--width and --height go together (scale to a size)")
    images = []
    for path in args.image:
        image = open_image(path, field="--image")
        image.load()
        images.append(image)
    request = ExtrasRequest(
        images=tuple(images),
        resize_mode=0 if args.width is None else 1,
        upscaling_resize=args.scale,
        max_side_length=args.max_side_length,
        upscaling_resize_w=args.width or 512,
        upscaling_resize_h=args.height or 512,
        upscaling_crop=not args.no_crop,
        upscaler_1=args.upscaler,
        upscaler_2=args.upscaler_2,
        upscaler_2_visibility=args.upscaler_2_visibility,
    )
    settings = _settings(args)
    service, _ = _service(args)
    result = service.postprocess(request)
    for image, parameters, text in zip(
        result.images, result.parameters, result.infotexts, strict=True
    ):
        png = extras_png(image, parameters, text)
        if args.out is not None:
            path = write_new_file(args.out, lambda n: f"{n:05d}.png", png)
        else:
            path = save_extras_png(settings.outputs_dir, png)
        print(path)
    return EXIT_OK


def _style_store(settings: Any) -> Any:
    from pipelines.styles import STYLES_FILE, StyleStore

    return StyleStore(settings.data_dir / STYLES_FILE)


def _list_styles(args: argparse.Namespace) -> int:
    """The styles, tab-separated (newlines and tabs in a text shown as \\n and \\t); rows
    that could not be read go to stderr with their line numbers."""
    sheet = _style_store(_settings(args)).sheet()

    def cell(text: str) -> str:
        return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")

    print("name\tprompt\tnegative_prompt")
    for style in sheet.styles:
        print("\t".join(cell(t) for t in (style.name, style.prompt, style.negative_prompt)))
    for problem in sheet.problems:
        print(f"warning: {problem}", file=sys.stderr)
    return EXIT_OK


def _list_upscalers(args: argparse.Namespace) -> int:
    service, _ = _service(args)
    print("name\tarchitecture\tscale\tproblem")
    for entry in service.upscalers():
        scale = f"{entry.scale}x" if entry.scale else ""
        print("\t".join((entry.name, entry.architecture or "?", scale, entry.error or "")))
    return EXIT_OK


def _list_vaes(args: argparse.Namespace) -> int:
    service, _ = _service(args)
    print("name\tlatent_channels\thash\tproblem")
    for entry in service.vaes():
        channels = str(entry.latent_channels or "?")
        row = (entry.relpath, channels, entry.short_hash or "", entry.error or "")
        print("\t".join(row))
    return EXIT_OK


def _list_embeddings(args: argparse.Namespace) -> int:
    from pipelines.folders.embeddings import read_embedding

    _, folders = _service(args)
    print("name\tvectors\twidths\tproblem")
    for entry in folders.entries("embedding"):
        if entry.error:
            print("\t".join((entry.name, "", "", entry.error)))
            continue
        try:
            embedding = read_embedding(entry.path, entry.name)
        except LorastackError as error:
            print("\t".join((entry.name, "", "", error.message)))
            continue
        widths = "+".join(str(w) for w in sorted(embedding.vectors))
        print("\t".join((entry.name, str(embedding.count), widths, "")))
    return EXIT_OK


def exit_code(error: LorastackError) -> int:
    """The documented exit code of an engine error."""
    if isinstance(error, InvalidRequestError):
        return EXIT_USAGE
    if isinstance(error, NotFoundError):
        return EXIT_NOT_FOUND
    if isinstance(error, UnusableFileError):
        return EXIT_UNUSABLE
    return EXIT_OTHER


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (see the module docstring)."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    command = {
        "generate": _generate,
        "extras": _extras,
        "list-models": _list_models,
        "list-loras": _list_loras,
        "list-upscalers": _list_upscalers,
        "list-vaes": _list_vaes,
        "list-embeddings": _list_embeddings,
        "list-styles": _list_styles,
    }
    try:
        return command[args.command](args)
    except LorastackError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return exit_code(error)
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_OTHER


if __name__ == "__main__":
    sys.exit(main())
