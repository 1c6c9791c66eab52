"""The A1111-compatible HTTP API under `/sdapi/v1`: routes, auth, errors, serving.

A thin client of the generation service: every JSON rule lives in `frontends.api.a1111`.
The API is its own FastAPI app, mounted at `/sdapi/v1` on a root app that also mounts the
Gradio page (or serves the API alone with `--nowebui`), so its auth, CORS and error
handlers cover exactly the API routes. Generation waits in a worker thread (sync work via
`run_in_threadpool`) for its job in the service's queue, so `progress`, `interrupt` and
`skip` answer while it runs.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Mount

from deployments.lora_sources import LoraSources
from frontends.api import a1111
from frontends.api import controlnet as controlnet_api
from frontends.api.lora_cards import add_lora_card_routes
from pipelines.errors import BusyError, InvalidRequestError, LorastackError
from pipelines.interface import GenerationService
from pipelines.limits import user_key
from pipelines.output import batch_number, encode_image, save_image
from pipelines.samplers import list_samplers, list_schedulers
from pipelines.schema import LATENT_UPSCALE_MODES
from pipelines.settings import Settings, parse_credentials
from pipelines.xyz import run_xyz

log = logging.getLogger(__name__)

API_PREFIX = "/sdapi/v1"
CONTROLNET_PREFIX = "/controlnet"


def _basic_credentials(header: str | None) -> tuple[str, str] | None:
    """(user, password) from an `Authorization: Basic ...` header, if it holds any."""
    scheme, _, encoded = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return user, password


def _check_basic(header: str | None, allowed: list[tuple[str, str]]) -> bool:
    """Constant-time check of an `Authorization: Basic ...` header against the pairs."""
    given = _basic_credentials(header)
    if given is None:
        return False
    user, password = given
    found = False
    for want_user, want_password in allowed:
        same_user = secrets.compare_digest(user.encode(), want_user.encode())
        same_password = secrets.compare_digest(password.encode(), want_password.encode())
        found |= same_user and same_password
    return found


def _error_response(error: Exception, status: int) -> JSONResponse:
    headers = {}
    if isinstance(error, BusyError):
        headers["Retry-After"] = str(error.retry_after)
    return JSONResponse(a1111.error_body(error, status), status_code=status, headers=headers)


async def _json_body(request: Request) -> Any:
    """The decoded JSON body; a missing or malformed one is the client's 422, never a 500.

    An empty body is refused as A1111's FastAPI refuses it ("Field required"), rather than
    read as `{}`: a client that lost its body must not start a full-size default job.
    """
    raw = await request.body()
    if not raw.strip():
        raise InvalidRequestError(
            "the request body is empty: send a JSON object ({} for all defaults)", field="body"
        )
    try:
        parsed = json.loads(raw)
        # "\udce9"-style escapes decode to lone surrogates, which no reply could encode
        json.dumps(parsed, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError) as error:  # RecursionError: a nesting bomb
        raise InvalidRequestError(
            f"the request body is not valid JSON: {error}", field="body"
        ) from error
    return parsed


def _with_fill(call: a1111.Txt2ImgCall, body: Any, fill: a1111.InfotextFill) -> a1111.Txt2ImgCall:
    """The call with what the body's `infotext` filled reported, and `infotext` echoed."""
    if isinstance(body, dict) and "infotext" in body:
        call.parameters = {**call.parameters, "infotext": body["infotext"]}
    call.ignored = sorted([*call.ignored, *fill.ignored])
    call.notes = [*fill.notes, *call.notes]
    return call


@contextmanager
def _infotext_errors(fill: a1111.InfotextFill) -> Iterator[None]:
    """An error about a field the infotext filled names `infotext` and its key (the
    client never sent that field)."""
    try:
        yield
    except LorastackError as error:
        key = fill.fields.get(error.field or "")
        if key is not None:
            error.message = f"infotext ({key} -> {error.field}): {error.message}"
            error.args = (error.message,)
            error.field = "infotext"
        raise


class A1111Api:
    """Route handlers over one service, with the options A1111 keeps between requests."""

    def __init__(self, service: GenerationService, settings: Settings) -> None:
        self.service = service
        self.settings = settings
        self.options = a1111.ApiOptions()

    # -- generation

    def txt2img(self, body: Any, user: str = "address:unknown") -> dict[str, Any]:
        """Generate for `user` (the key the per-user limits count under)."""
        merged, fill = a1111.apply_infotext(body, self.service, img2img=False)
        with _infotext_errors(fill):
            call = a1111.parse_txt2img(merged, self.options)
        return self._generate(_with_fill(call, body, fill), user, fill)

    def img2img(self, body: Any, user: str = "address:unknown") -> dict[str, Any]:
        """img2img, inpainting and the outpainting scripts, for `user`."""
        upscalers = self.service.upscaler_names()
        merged, fill = a1111.apply_infotext(body, self.service, img2img=True)
        with _infotext_errors(fill):
            call = a1111.parse_img2img(merged, self.options, upscalers)
        return self._generate(_with_fill(call, body, fill), user, fill)

    def extra_single_image(self, body: Any, user: str = "address:unknown") -> dict[str, Any]:
        """Extras on one image; as in A1111 the API never saves the result."""
        result = self.service.postprocess(a1111.parse_extras(body, batch=False), user=user)
        return a1111.extras_response(result, batch=False)

    def extra_batch_images(self, body: Any, user: str = "address:unknown") -> dict[str, Any]:
        result = self.service.postprocess(a1111.parse_extras(body, batch=True), user=user)
        return a1111.extras_response(result, batch=True)

    def _generate(
        self, call: a1111.Txt2ImgCall, user: str, fill: a1111.InfotextFill
    ) -> dict[str, Any]:
        try:
            with _infotext_errors(fill):
                return self._generate_call(call, user)
        except LorastackError as error:  # a unit's field, as the client named it
            field = controlnet_api.api_field(error.field, call.controlnet_indices)
            if field != error.field and error.field is not None:
                error.message = error.message.replace(error.field, field or "")
                error.args = (error.message,)
                error.field = field
            raise

    def _generate_call(self, call: a1111.Txt2ImgCall, user: str) -> dict[str, Any]:
        kind = call.request.kind
        if call.ignored:
            log.info("%s: ignored A1111 fields: %s", kind, ", ".join(call.ignored))
        started = time.time()
        grids = 0
        outputs, saving = self.settings.outputs_dir, self.service.save_options
        if call.xyz is not None:
            output = run_xyz(self.service, call.request, call.xyz, user=user)
            results, grids = [output.as_result(call.request)], output.grids
            for image, infotext, seed in output.unshown if call.save_images else ():
                save_image(outputs, image, infotext, seed, kind=f"{kind}-images", options=saving)
        elif call.series is not None:  # a script: its requests as one job
            label = call.series[0].prompt
            results = self.service.series(call.series, label=label, user=user)
        else:
            results = [self.service.generate(call.request, user=user)]
        if call.request.checkpoint and not call.restore_checkpoint:
            # override_settings_restore_afterwards false: the override stays selected
            self.service.select_checkpoint(call.request.checkpoint, user=user)
        if call.vae_override and not call.restore_checkpoint:
            self.options.sd_vae = call.vae_override
        pngs = []
        for result in results:
            for index, (image, seed, infotext) in enumerate(
                zip(result.images, result.seeds, result.infotexts, strict=True)
            ):
                encoded = encode_image(image, infotext, saving)  # A1111: samples_format too
                if call.save_images:
                    folder = f"{kind}-grids" if index < grids else f"{kind}-images"
                    number = batch_number(index - grids, result.request.batch_size)
                    save_image(
                        outputs,
                        image,
                        infotext,
                        seed,
                        kind=folder,
                        options=saving,
                        batch_number=None if index < grids else number,
                        data=encoded,
                    )
                pngs.append(encoded)
        if call.series is not None:
            return a1111.series_response(call, results, pngs, started)
        # sd-webui-controlnet appends each unit's map to the images (not the infotexts)
        maps = [controlnet_api.png_base64(image) for image in results[0].detected_maps]
        response = a1111.txt2img_response(call, results[0], pngs, started)
        if call.send_images and call.xyz is None:
            response["images"] = [*response["images"], *maps]
        return response

    # -- options

    def get_options(self) -> dict[str, Any]:
        model = self.service.current_model()
        title = model.title if model is not None else None
        sha = model.sha256 if model is not None else None
        service = self.service
        return a1111.current_options(
            title,
            sha,
            self.options,
            service.preview_method,
            service.save_options,
            service.paste_options,
            self.settings.checkpoints_limit,
        )

    def set_options(self, body: Any, user: str) -> dict[str, Any]:
        change = a1111.parse_options(body, self.get_options())
        if change.vae is not None:
            self.service.check_vae(change.vae)  # all or nothing: before anything changes
        saving = replace(self.service.save_options, **change.saving).checked()
        current = self.service.current_model()
        if change.checkpoint is not None and (
            current is None or change.checkpoint != current.title
        ):
            self.service.select_checkpoint(change.checkpoint, user=user)
        if change.clip_skip is not None:
            self.options.clip_skip = change.clip_skip
        if change.randn_source is not None:
            self.options.randn_source = change.randn_source
        if change.eta_noise_seed_delta is not None:
            self.options.eta_noise_seed_delta = change.eta_noise_seed_delta
        if change.fix_steps is not None:
            self.options.fix_steps = change.fix_steps
        if change.noise_multiplier is not None:
            self.options.noise_multiplier = change.noise_multiplier
        if change.vae is not None:
            self.options.sd_vae = self.service.check_vae(change.vae)
        if change.preview_method is not None:
            self.service.set_preview_method(change.preview_method)
        if change.saving:
            self.service.set_save_options(saving)
        if change.paste:
            self.service.set_paste_options(replace(self.service.paste_options, **change.paste))
        return self.get_options()

    # -- listings

    def sd_models(self) -> list[dict[str, Any]]:
        hide = self.settings.hide_paths
        items = [
            a1111.sd_model_item(entry, hide)
            for entry in self.service.checkpoints()
            if not entry.error
        ]
        model = self.service.current_model()
        if model is not None and model.is_demo:  # the built-in demo model
            demo = {"title": model.title, "model_name": model.name, "hash": None}
            items.insert(0, {**demo, "sha256": None, "filename": "", "config": None})
        return items

    def prompt_styles(self) -> list[dict[str, Any]]:
        return [a1111.prompt_style_item(style) for style in self.service.styles().styles]

    def png_info(self, body: Any) -> dict[str, Any]:
        return a1111.png_info(body, self.service.styles().styles)

    def loras(self) -> list[dict[str, Any]]:
        hide = self.settings.hide_paths
        return [a1111.lora_item(entry, hide) for entry in self.service.loras()]

    def sd_vae(self) -> list[dict[str, Any]]:
        hide = self.settings.hide_paths
        return [a1111.sd_vae_item(e, hide) for e in self.service.vaes() if not e.error]

    def upscalers(self) -> list[dict[str, Any]]:
        entries = {entry.name: entry for entry in self.service.upscalers()}
        return [
            a1111.upscaler_item(name, entries.get(name), self.settings.hide_paths)
            for name in self.service.upscaler_names()
        ]

    def progress(self, skip_current_image: bool) -> dict[str, Any]:
        snapshot = self.service.progress(preview=not skip_current_image)
        image = a1111.preview_png(snapshot.preview[0]) if snapshot.preview else None
        return a1111.progress_response(snapshot, image)


def _user(request: Request, checked: bool) -> str:
    """The key limits count under: the login only when the auth middleware checked it,
    else the client address."""
    given = _basic_credentials(request.headers.get("authorization")) if checked else None
    return user_key(given[0] if given else None, request.client.host if request.client else None)


def _guard(app: FastAPI, settings: Settings) -> None:
    """Error bodies in A1111's shape and `--api-auth` on every route of `app`."""
    credentials = parse_credentials(settings.api_auth) if settings.api_auth else None

    # 1. errors: the contract's table in A1111's body shape, never a 500 for the client
    @app.exception_handler(LorastackError)
    async def engine_error(request: Request, error: LorastackError) -> JSONResponse:
        return _error_response(error, error.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in item.get('loc', ()))}: {item.get('msg', '')}"
            for item in error.errors()
        )
        return _error_response(InvalidRequestError(f"invalid request: {problems}"), 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error_response(LorastackError(str(error.detail)), error.status_code)

    # 2. HTTP basic auth on every route (LoRA routes too, unlike A1111)
    if credentials:

        @app.middleware("http")
        async def require_auth(
            request: Request, call_next: Callable[[Request], Awaitable[Response]]
        ) -> Response:
            if _check_basic(request.headers.get("authorization"), credentials):
                return await call_next(request)
            body = a1111.error_body(LorastackError("missing or wrong API credentials"), 401)
            return JSONResponse(body, 401, headers={"WWW-Authenticate": 'Basic realm="api"'})


def build_api(
    service: GenerationService, settings: Settings, sources: LoraSources | None = None
) -> FastAPI:
    """The `/sdapi/v1` app (routes relative to the mount point).

    Args:
        service: the generation service (its per-user limits count the `--api-auth`
            login, else the client address).
        settings: launch settings (api_auth, hide_paths, outputs_dir, ...).
        sources: what `/loras/add` and `/loras/fetch-info` use (default: from settings).
    Returns:
        A FastAPI app to mount at API_PREFIX; `--api-auth` guards every route of it.
    """
    api = A1111Api(service, settings)
    app = FastAPI(title="lorastack A1111-compatible API", version=a1111.VERSION)
    credentials = parse_credentials(settings.api_auth) if settings.api_auth else None
    _guard(app, settings)  # 1. errors in A1111's shape, 2. --api-auth

    # 3. routes
    @app.post("/txt2img")
    async def txt2img(request: Request) -> Any:
        user = _user(request, bool(credentials))
        return await run_in_threadpool(api.txt2img, await _json_body(request), user)

    @app.post("/img2img")
    async def img2img(request: Request) -> Any:
        user = _user(request, bool(credentials))
        return await run_in_threadpool(api.img2img, await _json_body(request), user)

    @app.post("/extra-single-image")
    async def extra_single_image(request: Request) -> Any:
        user = _user(request, bool(credentials))
        return await run_in_threadpool(api.extra_single_image, await _json_body(request), user)

    @app.post("/extra-batch-images")
    async def extra_batch_images(request: Request) -> Any:
        user = _user(request, bool(credentials))
        return await run_in_threadpool(api.extra_batch_images, await _json_body(request), user)

    @app.get("/options")
    def get_options() -> Any:
        return api.get_options()

    @app.post("/options")
    async def set_options(request: Request) -> Any:
        user = _user(request, bool(credentials))
        return await run_in_threadpool(api.set_options, await _json_body(request), user)

    @app.get("/progress")
    def progress(skip_current_image: bool = False) -> Any:
        return api.progress(skip_current_image)

    @app.post("/interrupt")
    def interrupt() -> Any:
        service.interrupt()
        return {}

    @app.post("/skip")
    def skip() -> Any:
        service.skip()
        return None

    @app.post("/png-info")
    async def png_info(request: Request) -> Any:
        return await run_in_threadpool(api.png_info, await _json_body(request))

    app.get("/sd-models")(api.sd_models)
    # Both rescan both folders (cheap: unchanged files keep their facts and hashes).
    app.post("/refresh-checkpoints")(lambda: service.rescan())
    app.get("/loras")(api.loras)
    app.get("/prompt-styles")(api.prompt_styles)
    app.get("/upscalers")(api.upscalers)
    app.get("/sd-vae")(api.sd_vae)
    app.get("/embeddings")(lambda: a1111.embeddings_listing(service.embeddings()))
    app.post("/refresh-embeddings")(lambda: service.rescan())
    app.get("/scripts")(a1111.scripts_listing)
    app.post("/refresh-vae")(lambda: service.rescan())
    app.get("/latent-upscale-modes")(lambda: [{"name": name} for name in LATENT_UPSCALE_MODES])
    app.post("/refresh-loras")(lambda: service.rescan())
    app.get("/samplers")(list_samplers)
    app.get("/schedulers")(list_schedulers)
    app.get("/cmd-flags")(lambda: a1111.cmd_flags(settings))
    app.get("/memory")(service.memory)
    for path, shape in a1111.NEUTRAL_PROBES.items():
        app.get(f"/{path}")(lambda shape=shape: shape)
    sources = sources or LoraSources.from_settings(service, settings)
    add_lora_card_routes(app, sources, settings, _json_body)
    return app


def build_controlnet_api(service: GenerationService, settings: Settings) -> FastAPI:
    """sd-webui-controlnet's own routes, mounted at `/controlnet` (beside `/sdapi/v1`, as
    the extension serves them), with the API's auth and error bodies."""
    app = FastAPI(title="lorastack sd-webui-controlnet API", version=a1111.VERSION)
    _guard(app, settings)

    @app.get("/version")
    def version() -> Any:
        return {"version": controlnet_api.API_VERSION}

    @app.get("/model_list")
    def model_list(update: bool = True) -> Any:
        if update:
            service.rescan()
        return controlnet_api.model_list(service.controlnet_models())

    @app.get("/module_list")
    def module_list(alias_names: bool = False) -> Any:
        return controlnet_api.module_list(service.controlnet_modules(), alias_names)

    @app.get("/control_types")
    def control_types() -> Any:
        return controlnet_api.control_types(
            service.controlnet_modules(), service.controlnet_models()
        )

    @app.get("/settings")
    def unit_settings() -> Any:
        return {"control_net_unit_count": controlnet_api.UNIT_COUNT}

    @app.post("/detect")
    async def detect(request: Request) -> Any:
        module, images, resolution, a, b = controlnet_api.detect_request(await _json_body(request))
        maps = await run_in_threadpool(service.detect_controlnet, module, images, resolution, a, b)
        return controlnet_api.detect_response(maps)

    return app


def build_root(service: GenerationService, settings: Settings) -> FastAPI:
    """The server's root app: CORS (`--cors-allow-origins`), and the API when enabled.
    The Gradio page is mounted on it at "/" by the caller unless `--nowebui`."""
    root = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    if settings.cors_allow_origins:
        origins = [o.strip() for o in settings.cors_allow_origins.split(",") if o.strip()]
        root.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["*"],
            allow_headers=["*"],
            allow_credentials=True,
        )
    if settings.api or settings.nowebui:
        mount_api(root, build_api(service, settings), build_controlnet_api(service, settings))
    return root


def mount_api(app: FastAPI, api: FastAPI, controlnet: FastAPI | None = None) -> None:
    """Mount the API (and sd-webui-controlnet's routes) ahead of every other route, so no
    route of Gradio's can shadow them."""
    app.router.routes.insert(0, Mount(API_PREFIX, app=api))
    if controlnet is not None:
        app.router.routes.insert(1, Mount(CONTROLNET_PREFIX, app=controlnet))
