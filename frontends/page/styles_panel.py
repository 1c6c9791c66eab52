"""Prompt styles on the page, as A1111's styles row: pick styles (applied when generating),
📋 write them into the prompt boxes, save the prompts as a style, delete a style.

The styles live in `styles.csv` in the data dir (the service reads and saves it). Saving and
deleting change what every user of the server sees, so on a shared server (`--listen`,
`--share`) they are admin actions and ask for the `--admin-auth` credential.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gradio as gr

from frontends.page.errors import user_error
from frontends.page.lora_panel import QUICK
from pipelines.errors import LorastackError
from pipelines.interface import GenerationService
from pipelines.styles import STYLES_FILE, PromptStyle, StyleSheet, apply_styles

AdminCheck = Callable[[str, str], str | None]
"""(user, password) -> why the admin action is refused, or None."""


@dataclass
class StylesPanel:
    """One tab's styles row and its "Edit styles" section (`prompt`/`negative` are the
    tab's prompt boxes)."""

    prompt: gr.Textbox
    negative: gr.Textbox
    dropdown: gr.Dropdown
    apply: gr.Button
    name: gr.Dropdown
    save: gr.Button
    delete: gr.Button
    admin_user: gr.Textbox
    admin_password: gr.Textbox
    notes: gr.Markdown


# --------------------------------------------------------------------------- logic


def problems_text(sheet: StyleSheet) -> str:
    """The rows of styles.csv that did not load, one line each, for the page."""
    return "\n".join(f"⚠ {problem}" for problem in sheet.problems)


def apply_selected(
    service: GenerationService, prompt: str, negative: str, names: Sequence[str] | None
) -> tuple[str, str]:
    """A1111's 📋: the prompts with the selected styles merged in (the caller then clears
    the selection, so they are not applied twice). A name no longer in the file is an
    error naming it."""
    sheet = service.styles()
    styles = []
    for name in names or ():
        style = sheet.get(name)
        if style is None:
            raise LorastackError(f"style {name!r} is no longer in {STYLES_FILE}", field="styles")
        styles.append(style)
    return (
        apply_styles(prompt or "", [s.prompt for s in styles]),
        apply_styles(negative or "", [s.negative_prompt for s in styles]),
    )


def _refused(admin_check: AdminCheck | None, user: str, password: str, what: str) -> None:
    if admin_check is None:
        return
    reason = admin_check(user or "", password or "")
    if reason is not None:
        raise LorastackError(
            f"{what}: styles are shared by everyone, so this is an admin action; {reason}"
        )


def save_from_prompts(
    service: GenerationService,
    admin_check: AdminCheck | None,
    name: str | None,
    prompt: str,
    negative: str,
    user: str = "",
    password: str = "",
) -> StyleSheet:
    """Save the current prompts as style `name` (replacing one of that name), as A1111's
    "save style"; an admin action on a shared server."""
    _refused(admin_check, user, password, "Style not saved")
    return service.save_style(PromptStyle(name or "", prompt or "", negative or ""))


def delete_named(
    service: GenerationService,
    admin_check: AdminCheck | None,
    name: str | None,
    user: str = "",
    password: str = "",
) -> StyleSheet:
    """Delete style `name`; an admin action on a shared server."""
    _refused(admin_check, user, password, "Style not deleted")
    if not name:
        raise LorastackError("choose the style to delete", field="name")
    return service.delete_style(name)


# --------------------------------------------------------------------------- components


def build_styles(
    service: GenerationService,
    prompt: gr.Textbox,
    negative: gr.Textbox,
    prefix: str = "",
    *,
    shared: bool = False,
) -> StylesPanel:
    """The styles row under a tab's prompt boxes and a closed "Edit styles" section; the
    admin fields show only on a shared server (`shared`)."""
    sheet = service.styles()
    with gr.Row():
        dropdown = gr.Dropdown(
            sheet.names,
            value=[],
            multiselect=True,
            allow_custom_value=True,  # a style deleted meanwhile is refused by name, later
            label="Styles",
            info="applied to the prompts when generating (A1111's styles.csv)",
            elem_id=f"{prefix}styles",
            scale=4,
        )
        apply = gr.Button(
            "📋 Apply styles", scale=0, min_width=120, elem_id=f"{prefix}styles_apply"
        )
    with gr.Accordion("Edit styles", open=False, elem_id=f"{prefix}styles_edit"):
        with gr.Row():
            name = gr.Dropdown(
                sheet.names,
                value=None,
                allow_custom_value=True,
                label="Style name",
                info="a new name saves a new style; an existing one is replaced",
                elem_id=f"{prefix}style_name",
            )
            save = gr.Button("Save style from the prompts", elem_id=f"{prefix}style_save")
            delete = gr.Button("Delete style", variant="stop", elem_id=f"{prefix}style_delete")
        with gr.Row(visible=shared):
            admin_user = gr.Textbox(label="Admin user", elem_id=f"{prefix}styles_admin_user")
            admin_password = gr.Textbox(
                label="Admin password", type="password", elem_id=f"{prefix}styles_admin_password"
            )
        notes = gr.Markdown(problems_text(sheet), elem_id=f"{prefix}styles_notes")
    return StylesPanel(
        prompt, negative, dropdown, apply, name, save, delete, admin_user, admin_password, notes
    )


def wire_styles(
    service: GenerationService,
    page: gr.Blocks,
    panels: Sequence[StylesPanel],
    admin_check: AdminCheck | None,
) -> None:
    """Events of every tab's panel; a save or delete refreshes the choices of all of them,
    and a new page reads the file afresh (it may have been edited by hand)."""
    lists = [c for panel in panels for c in (panel.dropdown, panel.name, panel.notes)]

    def refreshed(sheet: StyleSheet) -> list[Any]:
        updates: list[Any] = []
        for _ in panels:
            updates += [
                gr.Dropdown(choices=sheet.names),
                gr.Dropdown(choices=sheet.names),
                problems_text(sheet),
            ]
        return updates

    page.load(lambda: refreshed(service.styles()), None, lists, **QUICK)
    for panel in panels:

        def on_apply(prompt: str, negative: str, names: list[str] | None) -> tuple[Any, ...]:
            try:
                styled, styled_negative = apply_selected(service, prompt, negative, names)
            except LorastackError as error:
                raise user_error(error.message) from error
            return styled, styled_negative, []

        boxes = [panel.prompt, panel.negative]
        panel.apply.click(on_apply, [*boxes, panel.dropdown], [*boxes, panel.dropdown], **QUICK)

        def on_save(name: str, prompt: str, negative: str, user: str, password: str) -> list[Any]:
            try:
                sheet = save_from_prompts(
                    service, admin_check, name, prompt, negative, user, password
                )
            except LorastackError as error:
                raise user_error(error.message) from error
            gr.Info(f"Style {name.strip()!r} saved to {STYLES_FILE}")
            return refreshed(sheet)

        admin = [panel.admin_user, panel.admin_password]
        panel.save.click(on_save, [panel.name, *boxes, *admin], lists, **QUICK)

        def on_delete(name: str, user: str, password: str) -> list[Any]:
            try:
                sheet = delete_named(service, admin_check, name, user, password)
            except LorastackError as error:
                raise user_error(error.message) from error
            gr.Info(f"Style {name!r} deleted from {STYLES_FILE}")
            return refreshed(sheet)

        panel.delete.click(on_delete, [panel.name, *admin], lists, **QUICK)
