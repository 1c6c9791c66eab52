"""lorastack's own LoRA routes beside A1111's (`/sdapi/v1/loras/add`, `/loras/fetch-info`):
JSON in, `deployments.lora_sources` does the work.

Each field is checked for its type and unknown fields are refused (422 naming them), never
ignored. A user's `hf_token` / `civitai_api_key` is used for that request only. On a shared
server (`--listen`, `--share`) adding files is an admin action (CONTRACT): the request
carries the `--admin-auth` pair in an `X-Admin-Auth: user:pass` header.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from deployments.lora_sources import Credentials, LoraSources
from pipelines.errors import InvalidRequestError, LorastackError
from pipelines.settings import Settings, admin_credentials

ADD_FIELDS: dict[str, tuple[type, ...]] = {
    "source": (str,),
    "filename": (str, type(None)),
    "overwrite": (bool,),
    "hf_token": (str, type(None)),
    "civitai_api_key": (str, type(None)),
}
FETCH_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "hf_token": (str, type(None)),
    "civitai_api_key": (str, type(None)),
}
REQUIRED = {"source", "name"}


class AdminRefused(LorastackError):
    """Missing or wrong admin credential for an admin action (401)."""

    status = 401


def checked_fields(body: Any, fields: dict[str, tuple[type, ...]]) -> dict[str, Any]:
    """The body's fields, each of its allowed types; InvalidRequestError naming the first
    field that is unknown, missing or of the wrong type."""
    if not isinstance(body, dict):
        raise InvalidRequestError("the body must be a JSON object", field="body")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise InvalidRequestError(
            f"unknown field {unknown[0]!r}; the fields are {', '.join(fields)}", field=unknown[0]
        )
    for name, types in fields.items():
        if name in REQUIRED and not body.get(name):
            raise InvalidRequestError(f"{name} is required", field=name)
        if name in body and not isinstance(body[name], types):
            wanted = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise InvalidRequestError(f"{name} must be {wanted}", field=name)
    return body


def admin_refusal(settings: Settings, header: str | None) -> str | None:
    """Why this request may not add files, or None. Only a shared server asks."""
    if not (settings.listen or settings.share):
        return None
    expected = admin_credentials(settings)
    if expected is None:
        return "adding files on a shared server is an admin action; start it with --admin-auth"
    user, _, password = (header or "").partition(":")
    same_user = secrets.compare_digest(user.encode(), expected[0].encode())
    same_password = secrets.compare_digest(password.encode(), expected[1].encode())
    if not (same_user and same_password):
        return "adding files is an admin action: send the X-Admin-Auth: user:pass header"
    return None


def add_lora_card_routes(
    app: FastAPI,
    sources: LoraSources,
    settings: Settings,
    read_json: Callable[[Request], Awaitable[Any]],
) -> None:
    """Register the two routes on the `/sdapi/v1` app; `read_json` is the API's body reader."""

    def guard(request: Request) -> None:
        reason = admin_refusal(settings, request.headers.get("x-admin-auth"))
        if reason is not None:
            raise AdminRefused(reason, field="X-Admin-Auth")

    @app.post("/loras/add")
    async def add(request: Request) -> Any:
        guard(request)
        body = checked_fields(await read_json(request), ADD_FIELDS)
        credentials = Credentials.of(body.get("hf_token"), body.get("civitai_api_key"))
        result = await run_in_threadpool(
            sources.add,
            body["source"],
            credentials,
            filename=body.get("filename"),
            overwrite=body.get("overwrite", False),
        )
        return result.summary()

    @app.post("/loras/fetch-info")
    async def fetch_info(request: Request) -> Any:
        guard(request)
        body = checked_fields(await read_json(request), FETCH_FIELDS)
        credentials = Credentials.of(body.get("hf_token"), body.get("civitai_api_key"))
        result = await run_in_threadpool(sources.fetch_info, body["name"], credentials)
        return result.summary()
