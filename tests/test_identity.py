"""Who a page visitor is: off a Space the login or the address; on a Space the Hugging Face
user (login enabled) or the Gradio session, never the proxy's address."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from frontends.page.identity import oauth_username, output_owner, visitor_key
from pipelines.settings import Settings

SPACE = {"SPACE_ID": "me/lorastack"}
OAUTH = SPACE | {"OAUTH_CLIENT_ID": "abc"}


def request(username: str | None = None, session: Any = None) -> SimpleNamespace:
    fields: dict[str, Any] = {"username": username, "session_hash": "s1"}
    fields["client"] = SimpleNamespace(host="10.0.0.7")
    if session is not None:
        fields["session"] = session
    return SimpleNamespace(**fields)


SIGNED_IN = {"oauth_info": {"userinfo": {"preferred_username": "hf-ann"}}}


@pytest.mark.parametrize(
    ("env", "made", "key"),
    [
        ({}, request(), "address:10.0.0.7"),
        ({}, request("ann"), "user:ann"),
        ({}, request(session=SIGNED_IN), "address:10.0.0.7"),  # OAuth only counts on a Space
        (SPACE, request(), "session:s1"),  # the proxy's address names nobody
        (SPACE, request("ann"), "user:ann"),  # --gradio-auth still wins
        (SPACE, request(session=SIGNED_IN), "session:s1"),  # login not enabled
        (OAUTH, request(session=SIGNED_IN), "user:hf-ann"),
        (OAUTH, request(session={}), "session:s1"),  # not signed in
        (OAUTH, request(), "session:s1"),  # no session middleware
    ],
)
def test_visitor_key(env: dict[str, str], made: SimpleNamespace, key: str) -> None:
    assert visitor_key(made, env) == key


def test_a_session_without_middleware_is_no_user() -> None:
    class Starlette:
        @property
        def session(self) -> dict[str, Any]:
            raise AssertionError("SessionMiddleware must be installed to access request.session")

    assert oauth_username(Starlette()) is None
    assert oauth_username(request(session={"oauth_info": {"userinfo": {}}})) is None


@pytest.mark.parametrize(
    ("settings", "env", "made", "owner"),
    [
        (Settings(), {}, request(), None),  # one local user: every image, as A1111
        (Settings(), {}, request("ann"), None),
        (Settings(listen=True), {}, request(), "address:10.0.0.7"),
        (Settings(listen=True), {}, request("ann"), "user:ann"),
        (Settings(share=True), {}, request(), "session:s1"),  # the tunnel's loopback
        (Settings(share=True), {}, request("ann"), "user:ann"),
        (Settings(), SPACE, request(), "session:s1"),
        (Settings(), OAUTH, request(session=SIGNED_IN), "user:hf-ann"),
    ],
)
def test_output_owner_only_on_a_shared_server(
    settings: Settings, env: dict[str, str], made: SimpleNamespace, owner: str | None
) -> None:
    assert output_owner(settings, made, env) == owner
