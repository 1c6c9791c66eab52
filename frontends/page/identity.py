"""Who a page visitor is, for per-user limits, "my jobs" and interrupting one's own job.

On a Space every visitor reaches the app through the same proxy, so the client address
names nobody. There the visitor is the Hugging Face user when the Space has login enabled
(`hf_oauth: true` in the README's front matter, which sets `OAUTH_CLIENT_ID`; Gradio keeps
the signed-in profile in the session as `oauth_info`), else the Gradio session, which a
page reload replaces (the page says so). Elsewhere: the user Gradio's own login checked,
else the client address.

The same visitor owns the images they make when the server is shared (`output_owner`):
the gallery lists, deletes and restores only those. A single local user owns nothing in
particular and sees every image, as in A1111.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pipelines.limits import user_key
from pipelines.settings import Settings

SESSION_NOTE = (
    "On this Space you are known by this page's session: your place in the queue, your "
    "limits, Interrupt and the images the Gallery shows you follow this tab, and a reload "
    "starts a new session (download the images you want to keep)."
)


def on_space(env: Mapping[str, str] | None = None) -> bool:
    return "SPACE_ID" in (os.environ if env is None else env)


def oauth_enabled(env: Mapping[str, str] | None = None) -> bool:
    """The Space has Hugging Face login (`hf_oauth: true`)."""
    return "OAUTH_CLIENT_ID" in (os.environ if env is None else env)


def oauth_username(request: Any) -> str | None:
    """The signed-in Hugging Face user of a Gradio request, if any."""
    try:
        session = request.session  # Starlette's session, present once OAuth is set up
    except (AttributeError, AssertionError, KeyError):
        return None
    info = session.get("oauth_info") if isinstance(session, Mapping) else None
    userinfo = info.get("userinfo") if isinstance(info, Mapping) else None
    name = userinfo.get("preferred_username") if isinstance(userinfo, Mapping) else None
    return name if isinstance(name, str) and name else None


def visitor_key(request: Any, env: Mapping[str, str] | None = None) -> str:
    """The key a page request's limits and jobs count under.

    Example:
        >>> visitor_key(None, {})
        'address:unknown'
    """
    client = getattr(request, "client", None)
    username = getattr(request, "username", None)
    if not on_space(env):
        return user_key(username, getattr(client, "host", None))
    if oauth_enabled(env):
        username = username or oauth_username(request)
    if username:
        return user_key(username, None)
    session = getattr(request, "session_hash", None)
    return f"session:{session}" if session else user_key(None, getattr(client, "host", None))


def output_owner(
    settings: Settings, request: Any, env: Mapping[str, str] | None = None
) -> str | None:
    """Who owns the images a page request saves and may see in the gallery: None (every
    image, as A1111) unless the server is shared (`--listen`, `--share`, a Space).

    Behind `--share`'s tunnel every visitor comes from the loopback address, so there a
    visitor without a login is their Gradio session, as on a Space.

    Example:
        >>> output_owner(Settings(), None, {}) is None
        True
    """
    if not (settings.listen or settings.share or on_space(env)):
        return None
    key = visitor_key(request, env)
    session = getattr(request, "session_hash", None)
    if settings.share and key.startswith("address:") and session:
        return f"session:{session}"
    return key
