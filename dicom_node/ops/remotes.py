"""Remote nodes: validation of a node's fields, warnings about likely mistakes, C-ECHO (QIDO-RS for a DICOMweb node).

Shared by ``anatomix-node ae ...``/``echo`` and the API's ``/api/nodes``. Errors are
:class:`~dicom_node.ops.errors.UserError` naming the field by the caller's label for it (the CLI's
``--ae-title``, the API's ``ae_title``).
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Mapping
from typing import Any, get_args

from dicom_node.ops.dicomweb_nodes import DICOMWEB_LABELS, describe_auth, dicomweb_fields, echo_dicomweb
from dicom_node.ops.errors import UserError
from dicom_node.settings import Settings, SettingsError, validate_ae_title
from dicom_node.store.base import RemoteNode, Role, RoutingRuleRecord, Store

_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: The port recorded for a source added without --port (DICOM's well-known port).
SOURCE_DEFAULT_PORT = 104


def validated_remote_node(
    settings: Settings,
    *,
    name: str,
    ae_title: str,
    host: str,
    port: int | str | None,
    role: str,
    profile: str | None = None,
    quiet_period_s: float | None = None,
    complete_on_release: bool = False,
    default_destination: bool = False,
    labels: Mapping[str, str] | None = None,
    url: str | None = None,
    auth_token_file: str | None = None,
    basic_auth_file: str | None = None,
    ca_file: str | None = None,
) -> RemoteNode:
    """A :class:`RemoteNode` from its fields, checked; UserError naming the bad one by ``labels[field]``
    (the field name itself when not given). A source without a port gets :data:`SOURCE_DEFAULT_PORT`.

    With ``url`` it is a DICOMweb destination (:func:`dicomweb_fields`): host and port come from the
    URL, the AE title is optional (role ``both`` with an AE title: it also sends to us by C-STORE).
    """
    label = {"name": "name", "ae_title": "ae_title", "host": "host", "port": "port", "quiet_period_s": "quiet_period_s", **DICOMWEB_LABELS,
             **(labels or {})}  # fmt: skip
    if role not in get_args(Role):
        raise UserError(f"role {role!r}: use one of {', '.join(get_args(Role))}")
    if not _NODE_NAME.match(name):
        raise UserError(f"{label['name']} {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    if url is not None or auth_token_file or basic_auth_file or ca_file:
        web = dicomweb_fields(url, auth_token_file, basic_auth_file, ca_file, role, label)
        if host and host.strip() and host.strip().lower() != web["host"].lower():
            raise UserError(f"{label['host']} {host!r}: a DICOMweb node's host is its URL's ({web['host']}); leave it out")
        if port is not None and str(port).strip() and validated_port(port, label["port"]) != web["port"]:
            raise UserError(f"{label['port']} {port!r}: a DICOMweb node's port is its URL's ({web['port']}); leave it out")
        if ae_title:  # only a node that also sends to us by C-STORE needs one (a STOW-RS sender is known by its token)
            try:
                validate_ae_title(label["ae_title"], ae_title)
            except SettingsError as exc:
                raise UserError(str(exc)) from None
        host, port = web.pop("host"), web.pop("port")
        profile = _checked_profile(settings, profile)
        if quiet_period_s is not None and quiet_period_s < 0:
            raise UserError(f"{label['quiet_period_s']} {quiet_period_s}: must be >= 0 seconds")
        return RemoteNode(name=name, ae_title=ae_title or "", host=host, port=port, role=role, profile=profile,  # type: ignore[arg-type]
                          quiet_period_s=quiet_period_s, complete_on_release=complete_on_release,
                          default_destination=default_destination, **web)  # fmt: skip
    try:
        validate_ae_title(label["ae_title"], ae_title)
    except SettingsError as exc:
        raise UserError(str(exc)) from None
    profile = _checked_profile(settings, profile)
    if port is None:
        if role != "source":
            raise UserError(f"{label['port']}: a {role} needs the DICOM port we send to (1-65535)")
        port = SOURCE_DEFAULT_PORT
    port = validated_port(port, label["port"])
    clean_host = host.strip()
    if not clean_host or any(c.isspace() for c in clean_host):
        raise UserError(f"{label['host']} {host!r}: give a host name or IP address, or '*' for any host")
    if clean_host == "*" and role != "source":
        raise UserError(f"{label['host']} '*' only suits a source: a {role} needs an address we can connect to")
    if quiet_period_s is not None and quiet_period_s < 0:
        raise UserError(f"{label['quiet_period_s']} {quiet_period_s}: must be >= 0 seconds")
    return RemoteNode(
        name=name,
        ae_title=ae_title,
        host=clean_host,
        port=port,
        role=role,  # type: ignore[arg-type]  # checked against Role above
        profile=profile,
        quiet_period_s=quiet_period_s,
        complete_on_release=complete_on_release,
        default_destination=default_destination,
    )


def _checked_profile(settings: Settings, profile: str | None) -> str:
    profile = profile or settings.output.default_profile
    try:
        settings.output.profile(profile)
    except SettingsError as exc:
        raise UserError(str(exc)) from None
    return profile


def validated_port(value: int | str, label: str = "port") -> int:
    """A TCP port (1-65535) from a number or its text; UserError naming ``label`` if bad."""
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise UserError(f"{label} {value!r}: not a number; give the DICOM port, 1-65535") from None
    if not 1 <= port <= 65535:
        raise UserError(f"{label} {port}: out of range; give the DICOM port, 1-65535")
    return port


def describe_remote(node: RemoteNode) -> str:
    """``AE@host:port``; a source-only node without a port of its own shows none; a DICOMweb node its URL."""
    if node.url:
        return f"DICOMweb {node.url}" + (f", {describe_auth(node)}" if node.auth_token_file or node.basic_auth_file else "")
    return f"{node.ae_title}@{node.host}" + ("" if node.role == "source" and node.port == SOURCE_DEFAULT_PORT else f":{node.port}")


def remote_node_warnings(node: RemoteNode, others: list[RemoteNode]) -> list[str]:
    """Accepted but probably wrong: the same AE title and host under another name, a host that does not resolve,
    credentials sent over plain http."""
    warnings = []
    if node.url and node.url.lower().startswith("http:") and (node.auth_token_file or node.basic_auth_file):
        warnings.append(f"{node.name}: its credentials go over plain http to {node.host}; use an https URL unless the network is trusted")
    for other in others:
        if other.name == node.name or not node.ae_title or other.ae_title != node.ae_title:
            continue
        if other.host == node.host or "*" in (other.host, node.host):
            warnings.append(f"{other.name!r} has the same AE title {node.ae_title} and host {other.host}: associations from it "
                            f"cannot be told apart; `anatomix-node ae remove` one of them, or `ae update` its AE title")  # fmt: skip
    if node.host != "*":
        try:
            socket.getaddrinfo(node.host, None)
        except socket.gaierror as exc:
            warnings.append(f"host {node.host!r} does not resolve here now ({exc.strerror}); check the name, or use an IP address")
        except UnicodeError:
            warnings.append(f"host {node.host!r} is not a valid host name")
    return warnings


def where_results_go(nodes: list[RemoteNode], rules: list[RoutingRuleRecord]) -> tuple[list[str], str | None]:
    """Where results of analysed studies will go, one line per destination, and a warning when nowhere.

    For ``init``, ``serve`` start-up and ``ae add``: default destinations get every study's results,
    a node that is both source and destination gets back those of the studies it sends, an enabled
    routing rule sends the studies it matches to the destinations it names. The warning (None when
    some destination is reachable) says how to make one.
    """
    by_name = {node.name: node for node in nodes}
    lines: list[str] = []
    for node in nodes:
        if node.is_destination and node.default_destination:
            lines.append(f"{node.name} ({describe_remote(node)}, profile {node.profile}): every study's results (default destination)")
        elif node.role == "both":
            lines.append(f"{node.name} ({describe_remote(node)}, profile {node.profile}): results of the studies it sends")
    for rule in rules:
        if not rule.enabled:
            continue
        names = [str(name) for name in rule.action.get("destinations", ()) if str(name) in by_name]
        sender = " and back to the sender" if rule.action.get("send_to_sender") else ""
        if names or sender:
            lines.append(f"routing rule {rule.name}: the studies it matches go to {', '.join(names) or 'no named node'}{sender}")
    if lines:
        return lines, None
    destinations = [node.name for node in nodes if node.is_destination]
    if destinations:
        warning = (f"results go nowhere: {', '.join(destinations)} {'is a destination' if len(destinations) == 1 else 'are destinations'} "
                   "but not a default one, and no routing rule names it; make one the default with "
                   f"`anatomix-node ae update {destinations[0]} --default-destination` (or add a rule: `anatomix-node route add`)")  # fmt: skip
    else:
        warning = ("results go nowhere: no destination is configured; add one with `anatomix-node ae add pacs --ae-title PACS "
                   "--host HOST --port PORT --role destination --default-destination`")  # fmt: skip
    return [], warning


def unreached_destination_warning(node: RemoteNode, rules: list[RoutingRuleRecord]) -> str | None:
    """For ``ae add``/``ae update``: a destination that will receive no result (not a default
    destination, not the sender's way back, named by no enabled routing rule), and how to fix it."""
    if not node.is_destination or node.default_destination or node.role == "both":
        return None
    if any(rule.enabled and node.name in [str(n) for n in rule.action.get("destinations", ())] for rule in rules):
        return None
    return (f"{node.name} is a destination but will receive no results: it is not a default destination and no routing rule "
            f"names it; make it the default with `anatomix-node ae update {node.name} --default-destination` "
            "(or name it in a rule: `anatomix-node route add`)")  # fmt: skip


def destination_health(store: Store) -> list[dict[str, Any]]:
    """Each destination's health, JSON-ready (CLI ``ae list``, console, API): every configured
    destination, plus any other name deliveries were made to (a node removed since).

    ``state``: ``down`` (the last attempt failed and objects are waiting), ``failing`` (the last
    attempt failed, nothing waiting), ``ok``, or ``unused`` (never tried).
    """
    from dicom_node.store.base import DestinationHealth

    nodes = {node.name: node for node in store.list_remote_nodes() if node.is_destination}
    health = {h.destination: h for h in store.list_destination_health()}
    rows = []
    for name in sorted(set(nodes) | set(health)):
        h = health.get(name) or DestinationHealth(name)
        node = nodes.get(name)
        rows.append({
            "name": name, "configured": node is not None, "default_destination": bool(node and node.default_destination),
            "state": h.state, "last_success_at": _iso(h.last_success_at), "last_failure_at": _iso(h.last_failure_at),
            "last_failure_reason": h.last_failure_reason, "waiting": h.waiting, "given_up": h.given_up,
            "next_attempt_at": _iso(h.next_attempt_at),
        })  # fmt: skip
    return rows


def _iso(value: Any) -> str | None:
    return None if value is None else value.isoformat()


def unknown_node_message(name: str) -> str:
    return f"no remote node named {name!r}; see `anatomix-node ae list`"


def require_remote_node(store: Store, name: str) -> RemoteNode:
    node = store.get_remote_node(name)
    if node is None:
        raise UserError(unknown_node_message(name))
    return node


def echo_remote(calling_ae: str, node: RemoteNode, timeout: float) -> float:
    """Associate, C-ECHO, release; return milliseconds from association request to response.
    A DICOMweb node gets a QIDO-RS query instead (:func:`~dicom_node.ops.dicomweb_nodes.echo_dicomweb`).

    Raises UserError with one line saying what failed (connection, rejection with the peer's
    reason, abort, or a non-success status).
    """
    if node.url:
        return echo_dicomweb(node, timeout)
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # the module sets its classes at import

    where = f"{node.name} ({node.ae_title}@{node.host}:{node.port})"
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    seen: dict[str, Any] = {}
    handlers: list[Any] = [
        (evt.EVT_CONN_OPEN, lambda event: seen.setdefault("connected", True)),
        (evt.EVT_ACSE_RECV, lambda event: seen.setdefault("response", event.primitive)),
    ]
    from dicom_node.net.tls import TlsConfigError, client_tls_args

    try:
        tls_args = client_tls_args(node)
    except TlsConfigError as exc:
        raise UserError(f"echo {where}: {exc}") from None
    started = time.perf_counter()
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title, evt_handlers=handlers, tls_args=tls_args)
    if not assoc.is_established:
        if not seen.get("connected"):
            failure = _connect_failure(node.host, node.port, timeout)
            if tls_args is not None and failure.startswith("the connection was closed"):
                failure = "the TLS handshake failed (its certificate and host name, --tls-ca, our --tls-cert; see the log)"
            raise UserError(f"echo {where}: {failure}")
        response = seen.get("response")
        if assoc.is_rejected and response is not None:
            raise UserError(f"echo {where}: association rejected ({response.result_str}): {response.reason_str}")
        if tls_args is not None and not assoc.is_rejected:  # TLS 1.3: a refused client certificate shows after the handshake
            raise UserError(f"echo {where}: the TLS connection was closed without an answer: the TLS handshake failed on its side? "
                           "(it may require our client certificate, --tls-cert/--tls-key, or not trust it)")  # fmt: skip
        raise UserError(f"echo {where}: association aborted or timed out (no acceptable answer within {timeout:g} s)")
    try:
        status = assoc.send_c_echo()
        elapsed_ms = (time.perf_counter() - started) * 1000
    finally:
        assoc.release()
    if not status or "Status" not in status:
        raise UserError(f"echo {where}: no C-ECHO response within {timeout:g} s")
    if status.Status != 0x0000:
        raise UserError(f"echo {where}: C-ECHO failed with status 0x{status.Status:04X}")
    return elapsed_ms


def _connect_failure(host: str, port: int, timeout: float) -> str:
    """Why a TCP connection to host:port fails (probed again to get the operating system's reason)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return "the connection was closed before the association request was answered"
    except socket.gaierror as exc:
        return f"host name {host!r} does not resolve ({exc.strerror})"
    except TimeoutError:
        return f"no answer from {host}:{port} within {timeout:g} s (firewall or wrong address?)"
    except OSError as exc:
        return f"cannot connect to {host}:{port}: {exc.strerror or exc} (is the node running and the port right?)"
