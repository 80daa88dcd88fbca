"""OHIF served same-origin with Orthanc's DICOMweb: a tiny static server and reverse proxy (test only).

``/dicom-web/...`` is forwarded to Orthanc's HTTP port; everything else is the OHIF dist, with
``app-config.js`` replaced by a configuration whose only data source is that same-origin DICOMweb, and
unknown paths answered with ``index.html`` (OHIF is a single-page app: ``/viewer?...``).
The OHIF dist, playwright-core and chromium are installed by ``deploy/install-viewer.sh`` into
``.cache/viewer`` (ignored), once.
"""

from __future__ import annotations

import http.client
import mimetypes
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "viewer"
OHIF_VERSION = "3.13.2"

APP_CONFIG = """
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
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (test)',
        name: 'orthanc',
        wadoUriRoot: '/dicom-web',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
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


def install_viewer() -> Path:
    """Run the project's installer (idempotent, cached) and return the OHIF dist folder."""
    done = subprocess.run(["bash", str(REPO / "deploy" / "install-viewer.sh"), str(CACHE)], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"deploy/install-viewer.sh failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return CACHE / f"ohif-{OHIF_VERSION}" / "dist"


class OhifServer:
    """Serves ``dist`` on 127.0.0.1 (a free port) and proxies /dicom-web to ``orthanc_port``."""

    def __init__(self, dist: Path, orthanc_port: int) -> None:
        self.dist = dist
        self.orthanc_port = orthanc_port
        handler = self._handler()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
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

            def do_GET(self) -> None:
                if self.path.startswith("/dicom-web/"):
                    self._proxy()
                    return
                path = self.path.split("?", 1)[0]
                if path == "/app-config.js":
                    self._send(200, APP_CONFIG.encode(), "application/javascript")
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
                connection = http.client.HTTPConnection("127.0.0.1", server.orthanc_port, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "content-type", "range")}
                connection.request("GET", self.path, headers=headers)
                response = connection.getresponse()
                body = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() in ("content-type",):
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
