"""On a shared server nobody fetches an image from the outputs folder by guessing its path.

The page never hands out a URL inside the outputs folder: Gradio copies every file an
event returns into its own cache, under a folder named by the file's hash, and serves that
copy. The outputs folder and the thumbnails are among Gradio's allowed paths only so that
Gradio may copy them; its file route would also serve them to anyone who asks by path
(`/gradio_api/file=/data/outputs/txt2img-images/2026-12-04/00012-42.png`), so on a shared
server this middleware answers such a request with 404.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

FILE_ROUTE = re.compile(r"^(?:/gradio_api)?/file=(.+)$")


class PrivateFolders:
    """ASGI middleware: Gradio's file route refuses any path inside `folders`."""

    def __init__(self, app: ASGIApp, folders: Sequence[Path]) -> None:
        self.app = app
        self.folders = tuple(Path(folder).resolve() for folder in folders)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            match = FILE_ROUTE.match(scope.get("path", ""))
            if match and self.inside(match.group(1)):
                await PlainTextResponse("Not found", status_code=404)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def inside(self, asked: str) -> bool:
        """Whether `asked` (absolute, or relative to the working folder as Gradio reads
        it) is in one of the folders."""
        try:
            path = Path(asked).resolve()
        except (OSError, ValueError):
            return False
        return any(path == folder or folder in path.parents for folder in self.folders)
