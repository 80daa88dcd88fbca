"""A real Orthanc (Debian package) on free loopback ports, as the PACS in tests."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.net import free_port, wait_for_port
from tests.support.processes import stop_process

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
GDCM_PLUGIN = "/usr/share/orthanc/plugins/libOrthancGdcm.so"
PLUGINS = (DICOMWEB_PLUGIN, GDCM_PLUGIN)


@dataclass
class Orthanc:
    """One Orthanc process. ``modalities`` maps a name to (AET, port) on 127.0.0.1; ``plugins``: the
    plugin libraries it loads (those installed)."""

    workdir: Path
    aet: str = "ORTHANC"
    modalities: dict[str, tuple[str, int]] = field(default_factory=dict)
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    plugins: tuple[str, ...] = PLUGINS
    #: Authentication on: HTTP basic for these users (RegisteredUsers); the REST helpers log in as the first.
    users: dict[str, str] = field(default_factory=dict)
    #: Authentication on: only requests carrying ``Authorization: Bearer <token>`` (a Lua IncomingHttpRequestFilter; 403 otherwise).
    bearer_token: str | None = None
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "anatomix-test-pacs",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "StableAge": 2,
            "SaveJobs": False,
            "Plugins": [p for p in self.plugins if Path(p).exists()],
            "DicomModalities": {name: {"AET": aet, "Host": "127.0.0.1", "Port": port} for name, (aet, port) in self.modalities.items()},
        }
        if self.users:
            config.update(AuthenticationEnabled=True, RegisteredUsers=self.users)
        if self.bearer_token:
            lua = self.workdir / "bearer.lua"
            lua.write_text('function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)\n'
                           f'  return httpHeaders["authorization"] == "Bearer {self.bearer_token}"\nend\n')  # fmt: skip
            config["LuaScripts"] = [str(lua)]
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def start(self) -> Orthanc:
        if shutil.which("Orthanc") is None:
            raise RuntimeError("Orthanc is not installed: run `make peers` (Debian package orthanc)")
        config = self.write_config()
        log = open(self.workdir / "orthanc.log", "ab")
        self.process = subprocess.Popen(["Orthanc", str(config)], stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.http_port, timeout=60)
        wait_for_port(self.dicom_port, timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        raise TimeoutError("Orthanc did not answer its REST API")

    def stop(self) -> None:
        stop_process(self.process, timeout=20)
        self.process = None

    # ---- REST --------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: bytes | dict[str, Any] | None = None, timeout: float = 120) -> Any:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=self.auth_headers())
        with urllib.request.urlopen(req, timeout=timeout) as response:
            payload = response.read()
        ctype = response.headers.get("Content-Type", "")
        return json.loads(payload) if "json" in ctype and payload else payload

    def auth_headers(self) -> dict[str, str]:
        if self.bearer_token:
            return {"Authorization": f"Bearer {self.bearer_token}"}
        if self.users:
            user, password = next(iter(self.users.items()))
            return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
        return {}

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: bytes | dict[str, Any] | None = None) -> Any:
        return self.request("POST", path, body)

    def upload(self, path: Path) -> dict[str, Any]:
        return self.post("/instances", path.read_bytes())

    def instance_tags(self, orthanc_id: str) -> dict[str, Any]:
        return self.get(f"/instances/{orthanc_id}/tags?simplify")
