"""User errors on the page: a readable message in the browser and one log line, never a
traceback (a wrong LoRA name is the user's mistake, not the server's)."""

from __future__ import annotations

import logging

import gradio as gr

log = logging.getLogger("lorastack.page")


def user_error(message: str) -> gr.Error:
    """The `gr.Error` to raise for a user mistake; logs it once, without a traceback."""
    log.info("refused: %s", message)
    return gr.Error(message, print_exception=False)
