"""Configured host names -> IP addresses, resolved off the accept path and cached.

A source may be configured by host name; acceptance (``Store.find_source``) compares the peer's
address with what that name resolves to. Resolving there would make every sender wait on the
resolver while its association is pending (a slow or dead DNS server stalls them all), so lookups
here never start a resolution in the caller's thread:

- the SCP process resolves every configured source's host when it loads the nodes (its housekeeping
  thread, at start and every ``PortHousekeeping.TRUSTED_REFRESH_S``), all names at once;
- :meth:`HostAddresses.lookup` answers from the cache; an entry older than ``refresh_s`` is still
  answered while a background thread resolves it again;
- a name this process has never resolved is resolved in the background, and the lookup waits for
  it at most ``first_wait_s`` (a working resolver answers well within it); past that it answers
  ``None`` ("not known yet") and the SCP rejects the association as transient, so the sender retries.

A name that does not resolve is cached as resolving to nothing (matches no peer) and retried at the
next refresh. IP literals are never looked up.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: Seconds a resolved name is used before it is resolved again (in the background).
REFRESH_S = 60.0
#: Seconds a lookup of a never-resolved name waits for its background resolution.
FIRST_WAIT_S = 0.25


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def resolve_host(name: str) -> frozenset[str]:
    """The addresses ``name`` resolves to (blocking; empty when it does not resolve)."""
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as exc:  # socket.gaierror is an OSError
        log.warning("host %r does not resolve (%s): it matches no peer until it does", name, exc)
        return frozenset()
    return frozenset(str(info[4][0]) for info in infos)


@dataclass(frozen=True)
class _Entry:
    addresses: frozenset[str]
    resolved_at: float  # time.monotonic()


class HostAddresses:
    """A per-process cache of host name -> addresses (thread-safe). See the module docstring."""

    def __init__(self, refresh_s: float = REFRESH_S, first_wait_s: float = FIRST_WAIT_S) -> None:
        self.refresh_s = refresh_s
        self.first_wait_s = first_wait_s
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._in_flight: dict[str, threading.Event] = {}

    def resolve_now(self, names: Iterable[str]) -> None:
        """Resolve these names again (all at once) and wait until they are done; for a background
        thread, never the accept path. A name already being resolved is waited for, not resolved twice."""
        for done in [self._start(name) for name in {n.lower() for n in names if n and not is_ip_literal(n)}]:
            done.wait()

    def lookup(self, name: str) -> frozenset[str] | None:
        """The cached addresses of ``name`` without resolving in this thread (see the module
        docstring); ``None`` when it has never been resolved and its resolution is still running."""
        key = name.lower()
        with self._lock:
            entry = self._entries.get(key)
        if entry is not None:
            if time.monotonic() - entry.resolved_at > self.refresh_s:
                self._start(key)  # the old answer serves until the new one arrives
            return entry.addresses
        if not self._start(key).wait(self.first_wait_s):
            return None
        with self._lock:
            entry = self._entries.get(key)
        return entry.addresses if entry is not None else None

    def cached(self, names: Iterable[str]) -> set[str]:
        """Every cached address of these names (nothing resolved; unknown names add nothing)."""
        with self._lock:
            return {a for n in names if (e := self._entries.get(n.lower())) is not None for a in e.addresses}

    def _start(self, key: str) -> threading.Event:
        with self._lock:
            done = self._in_flight.get(key)
            if done is not None:
                return done
            done = self._in_flight[key] = threading.Event()
        threading.Thread(target=self._resolve_in_background, args=(key, done), name="resolve-host", daemon=True).start()
        return done

    def _resolve_in_background(self, key: str, done: threading.Event) -> None:
        try:
            self._store(key, resolve_host(key))
        finally:
            with self._lock:
                self._in_flight.pop(key, None)
            done.set()

    def _store(self, key: str, addresses: frozenset[str]) -> None:
        with self._lock:
            self._entries[key] = _Entry(addresses, time.monotonic())
