"""The operations API of a real ``anatomix-node serve`` (``tests.support.node.NodeProcess`` with
an ``[http]`` port), reached over real HTTP with httpx; accounts made through the store."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

from dicom_node.api import auth
from tests.support.net import free_port
from tests.support.node import NodeProcess


def api_node(workdir, **kwargs: Any) -> NodeProcess:
    """A NodeProcess whose settings turn the HTTP API on at a free port (not yet started)."""
    settings = kwargs.pop("settings", {})
    settings.setdefault("http", {})["port"] = free_port()
    return NodeProcess(workdir, settings=settings, **kwargs)


def http_url(node: NodeProcess) -> str:
    return f"http://127.0.0.1:{node.settings['http']['port']}"


def wait_for_http(node: NodeProcess, timeout: float = 60) -> None:
    """serve logs its ready line before the spawned HTTP process answers: poll /healthz."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if httpx.get(http_url(node) + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.2)
    raise TimeoutError(f"the HTTP API did not answer in {timeout:.0f} s ({last}):\n{node.log_text()[-3000:]}")


@dataclass
class Accounts:
    """One account (and API token) per role."""

    tokens: dict[str, str] = field(default_factory=dict)
    passwords: dict[str, str] = field(default_factory=dict)


def make_accounts(node: NodeProcess, roles: tuple[str, ...] = ("viewer", "operator", "admin")) -> Accounts:
    accounts = Accounts()
    store = node.open_store()
    try:
        for role in roles:
            password = auth.generate_password()
            store.add_api_user(auth.new_user(role, role, password))
            secret = auth.new_secret(auth.TOKEN_PREFIX)
            store.add_api_token(role, "tests", auth.secret_hash(secret), datetime.now(UTC))
            accounts.tokens[role], accounts.passwords[role] = secret, password
    finally:
        store.close()
    return accounts


def client(node: NodeProcess, token: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=http_url(node), headers=headers, timeout=60)
