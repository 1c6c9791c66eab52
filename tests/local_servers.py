"""Two local HTTP servers for the stand-ins of outside services (`fake_hub`,
`fake_civitai`): the API and a "CDN" on another port, i.e. another origin, as the real
services have, so tests see which host received what. 127.0.0.1 only."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self


class ApiAndCdn:
    """Mixin for a stand-in's state class: call `open_servers` once, then use the class
    as a context manager; `url` is the API's endpoint, `cdn_url` the other origin's."""

    _servers: list[ThreadingHTTPServer]
    _threads: list[threading.Thread]

    def open_servers(
        self,
        handler: type[BaseHTTPRequestHandler],
        server_class: type[ThreadingHTTPServer] = ThreadingHTTPServer,
    ) -> None:
        self._servers = [server_class(("127.0.0.1", 0), handler) for _ in range(2)]
        for server in self._servers:
            server.daemon_threads = True
        self._threads = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    def __enter__(self) -> Self:
        for server in self._servers:
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
            thread.daemon = True
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
