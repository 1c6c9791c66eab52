"""The guards around Gradio's server (frontends/page/gradio_guards.py): a render's load
events survive another thread adding a block meanwhile, and a client that left mid-upload
is one log line, not a traceback."""

from __future__ import annotations

import logging
import sys

import pytest
from gradio.blocks import BlocksConfig
from starlette.requests import ClientDisconnect

from frontends.page.gradio_guards import (
    GRADIO_ATTACH_LOAD_EVENTS,
    ClientLeftFilter,
    attach_load_events,
)

RENDER = object()
"""The render whose components get their load events (a `gr.render` in the app)."""


class WriterMidLoop:
    """A block the loop looks at; reading its `rendered_in` adds a block to the table, as
    `SessionState.__setitem__` does from another thread at that moment."""

    def __init__(self, config: BlocksConfig) -> None:
        self.config = config

    @property
    def rendered_in(self) -> None:
        self.config.blocks[max(self.config.blocks) + 1] = object()  # type: ignore[assignment]
        return None


def config_with_a_writer() -> BlocksConfig:
    config = BlocksConfig.__new__(BlocksConfig)  # only its table of blocks is used
    config.blocks = {1: WriterMidLoop(config)}  # type: ignore[dict-item]
    return config


def test_gradios_own_loop_fails_on_the_race() -> None:
    with pytest.raises(RuntimeError, match="changed size during iteration"):
        GRADIO_ATTACH_LOAD_EVENTS(config_with_a_writer(), RENDER)


def test_the_guard_survives_the_writer_and_keeps_its_block() -> None:
    config = config_with_a_writer()
    attach_load_events(config, RENDER)
    assert sorted(config.blocks) == [1, 2]


def record_of(error: BaseException) -> logging.LogRecord:
    try:
        raise error
    except BaseException:
        return logging.LogRecord(
            "uvicorn.error",
            logging.ERROR,
            __file__,
            1,
            "Exception in ASGI application",
            None,
            sys.exc_info(),
        )


def test_a_client_that_left_is_one_info_line(caplog: pytest.LogCaptureFixture) -> None:
    guard = ClientLeftFilter()
    with caplog.at_level(logging.INFO, logger="lorastack.page"):
        assert guard.filter(record_of(ClientDisconnect())) is False
        assert guard.filter(record_of(ValueError("a real server error"))) is True
        assert guard.filter(logging.LogRecord("uvicorn.error", 20, "", 1, "hi", None, None))
    assert [r.getMessage() for r in caplog.records] == [
        "a browser left during its upload; nothing was saved from it"
    ]
