"""The ``[http]`` settings and ``serve --http-port``; the login limiter's window (pure logic)."""

from __future__ import annotations

import time

import pytest

from dicom_node.api.auth import LoginLimiter, role_at_least
from dicom_node.cli.main import build_parser
from dicom_node.cli.serve import load_serve_settings
from dicom_node.settings import SettingsError, load_settings


def test_http_defaults_env_and_the_serve_option(tmp_path):
    defaults = load_settings(None, env={})
    assert (defaults.http.port, defaults.http.bind_address) == (8080, "127.0.0.1")
    assert load_settings(None, env={"ANATOMIX_HTTP_PORT": "9090"}).http.port == 9090
    config = tmp_path / "anatomix-node.toml"
    config.write_text('[http]\nport = 8181\nbind_address = "0.0.0.0"\n')
    args = build_parser().parse_args(["serve", "--config", str(config), "--http-port", "0"])
    settings = load_serve_settings(args)
    assert (settings.http.port, settings.http.bind_address) == (0, "0.0.0.0")
    assert load_serve_settings(build_parser().parse_args(["serve", "--config", str(config)])).http.port == 8181
    config.write_text("[http]\nport = 70000\n")
    with pytest.raises(SettingsError, match="http.port = 70000"):
        load_settings(config, env={})


def test_login_limiter_counts_per_key_and_forgets_after_the_window():
    limiter = LoginLimiter(max_failures=2, window_s=0.5)
    keys = ["user:a", "addr:1.2.3.4"]
    assert limiter.retry_after(keys) == 0
    limiter.failed(keys)
    limiter.failed(keys)
    assert 0 < limiter.retry_after(keys) <= 0.5  # the user key is at its limit
    assert limiter.retry_after(["user:b", "addr:1.2.3.4"]) == 0  # the address may fail 4x as often
    time.sleep(0.6)
    assert limiter.retry_after(keys) == 0
    assert role_at_least("admin", "operator") and not role_at_least("viewer", "operator")
