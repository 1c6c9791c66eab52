"""Two guards around Gradio 6.31's server, installed once by `app.py` before it serves.

1. A race in reactive renders: `BlocksConfig.attach_load_events`, run at the end of every
   `gr.render`, iterates the session's table of blocks, while an event of the same session
   that updates a component (`SessionState.__setitem__`, on another worker thread) may add
   to that table: "dictionary changed size during iteration", and the render is lost (seen
   in the browser tests beside a second test worker on 2 cores). Our renders already run
   one at a time (`ONE_RENDER_AT_A_TIME`); the other writer is Gradio's. The guard iterates
   a snapshot of the table, taken under the GIL in one C call, and is otherwise Gradio's
   own loop.
2. A browser that leaves during an upload (a closed tab, a reload) makes Gradio's upload
   route raise `ClientDisconnect`, which uvicorn logs as "Exception in ASGI application"
   with a traceback. Nothing failed on the server: that record becomes one info line.
"""

from __future__ import annotations

import logging
from typing import Any

from gradio import components
from gradio.blocks import BlocksConfig
from gradio.events import EventListenerMethod
from starlette.requests import ClientDisconnect

log = logging.getLogger("lorastack.page")

GRADIO_ATTACH_LOAD_EVENTS = BlocksConfig.attach_load_events
"""Gradio's own loop, kept for the test that shows the race."""


def attach_load_events(self: BlocksConfig, rendered_in: Any = None) -> None:
    """Gradio 6.31's `BlocksConfig.attach_load_events` over a snapshot of `self.blocks`."""
    for component in list(self.blocks.values()):
        if rendered_in is not None and component.rendered_in != rendered_in:
            continue
        if isinstance(component, components.Component) and component.load_event_to_attach:
            load_fn, triggers, inputs = component.load_event_to_attach
            has_target = len(triggers) > 0
            triggers += [(self.root_block, "load")]
            dep = self.set_event_trigger(
                [EventListenerMethod(*trigger) for trigger in triggers],
                load_fn,
                inputs,
                component,
                no_target=False,
                show_progress="hidden" if has_target else "full",
            )[0]
            component.load_event = dep.get_config()


class ClientLeftFilter(logging.Filter):
    """Turns uvicorn's traceback for a client that disconnected mid-request into one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, ClientDisconnect):
            log.info("a browser left during its upload; nothing was saved from it")
            return False
        return True


def install() -> None:
    """Install both guards (idempotent)."""
    BlocksConfig.attach_load_events = attach_load_events  # type: ignore[method-assign]
    uvicorn_errors = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, ClientLeftFilter) for f in uvicorn_errors.filters):
        uvicorn_errors.addFilter(ClientLeftFilter())
