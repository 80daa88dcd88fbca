"""OHIF served same-origin with a DICOMweb server: a tiny static server and reverse proxy (test only).

Paths under the proxied prefixes (``/dicom-web/`` for Orthanc; ``/dicomweb/``, ``/api/`` and
``/console/`` for the node, as a site's reverse proxy would put the node and OHIF on one origin) are
forwarded to the upstream HTTP port with the request's credentials (Authorization, cookies, the CSRF
header); everything else is the OHIF dist, with ``app-config.js`` replaced by a configuration whose
only data source is the same-origin DICOMweb root, and unknown paths answered with ``index.html``
(OHIF is a single-page app: ``/viewer?...``).
The OHIF dist, playwright-core and chromium are installed by ``deploy/install-viewer.sh`` into
``.cache/viewer`` (ignored), once.
"""

from __future__ import annotations

import http.client
import mimetypes
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "viewer"
OHIF_VERSION = "3.13.2"

APP_CONFIG_TEMPLATE = """
window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: false,
  showErrorDetails: 'always',
  defaultDataSourceName: '@NAME@',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: '@NAME@',
      configuration: {
        friendlyName: '@NAME@ (test)',
        name: '@NAME@',
        wadoUriRoot: '@ROOT@',
        qidoRoot: '@ROOT@',
        wadoRoot: '@ROOT@',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};
"""


def app_config(root: str, name: str) -> str:
    """OHIF's configuration with one DICOMweb data source at the same-origin ``root``."""
    return APP_CONFIG_TEMPLATE.replace("@ROOT@", root).replace("@NAME@", name)


#: Orthanc's DICOMweb plugin as the data source (tests/viewer/test_ohif.py).
APP_CONFIG = app_config("/dicom-web", "orthanc")
#: Request and response headers the proxy passes on.
REQUEST_HEADERS = ("accept", "content-type", "range", "authorization", "cookie", "x-csrf-token")
RESPONSE_HEADERS = ("content-type", "set-cookie", "location", "www-authenticate")


def install_viewer() -> Path:
    """Run the project's installer (idempotent, cached) and return the OHIF dist folder."""
    done = subprocess.run(["bash", str(REPO / "deploy" / "install-viewer.sh"), str(CACHE)], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"deploy/install-viewer.sh failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return CACHE / f"ohif-{OHIF_VERSION}" / "dist"


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """A browser closing a page drops its connections mid-request: not an error of the test."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class OhifServer:
    """Serves ``dist`` on 127.0.0.1 (a free port) and proxies ``prefixes`` to ``upstream_port``;
    OHIF's data source is ``root`` (default: Orthanc's /dicom-web)."""

    def __init__(self, dist: Path, upstream_port: int, prefixes: tuple[str, ...] = ("/dicom-web/",), root: str = "/dicom-web",
                 name: str = "orthanc") -> None:  # fmt: skip
        self.dist = dist
        self.upstream_port = upstream_port
        self.prefixes = prefixes
        self.config = app_config(root, name)
        #: (method, path, status, Accept header, seconds) of every proxied request, in order.
        self.proxied: list[tuple[str, str, int, str, float]] = []
        handler = self._handler()
        self.httpd = _QuietServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> OhifServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                return

            def do_POST(self) -> None:
                if self.path.startswith(server.prefixes):
                    self._proxy()
                else:
                    self._send(405, b"", "text/plain")

            def do_GET(self) -> None:
                if self.path.startswith(server.prefixes):
                    self._proxy()
                    return
                path = self.path.split("?", 1)[0]
                if path == "/app-config.js":
                    self._send(200, server.config.encode(), "application/javascript")
                    return
                target = (server.dist / path.lstrip("/")).resolve()
                if not str(target).startswith(str(server.dist.resolve())) or not target.is_file():
                    target = server.dist / "index.html"
                body = target.read_bytes()
                ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
                if target.suffix == ".wasm":
                    ctype = "application/wasm"
                self._send(200, body, ctype)

            def _proxy(self) -> None:
                started = time.monotonic()
                connection = http.client.HTTPConnection("127.0.0.1", server.upstream_port, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() in REQUEST_HEADERS}
                length = int(self.headers.get("Content-Length") or 0)
                connection.request(self.command, self.path, body=self.rfile.read(length) if length else None, headers=headers)
                response = connection.getresponse()
                body = response.read()
                server.proxied.append((self.command, self.path, response.status, self.headers.get("Accept", ""), time.monotonic() - started))
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() in RESPONSE_HEADERS:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                connection.close()

            def _send(self, status: int, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cross-Origin-Opener-Policy", "same-origin")
                self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
                self.end_headers()
                self.wfile.write(body)

        return Handler
