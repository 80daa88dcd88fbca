"""Presentation-context negotiation that also accepts private and unknown storage SOP classes.

A PACS pushing a whole study may include vendor-private objects (private SOP Class UIDs) or
objects of storage classes newer than pynetdicom's table. pynetdicom only accepts abstract syntaxes
it was told about, so such a push would partly fail. Its own remedy,
``_config.UNRESTRICTED_STORAGE_SERVICE``, accepts the sender's *first* transfer syntax for every
storage context, which would let in syntaxes we cannot decode.

We keep both properties: standard classes are negotiated exactly as before (our decodable syntax
list), and a private or unknown abstract syntax is treated as one more storage class with that same
syntax list. Such instances are stored, recorded and skipped for analysis like any other
non-image object. pynetdicom calls ``pynetdicom.acse.negotiate_unrestricted`` when the unrestricted
switch is on, and the switch also routes every C-STORE to the storage service, which is what a
private class needs; we install our negotiation function there. The tests that push a private class
fail if a pynetdicom upgrade moves that hook.

The switch is process-wide, so installing it is an explicit step of the node's SCP processes
(``anatomix-node serve`` does it once per SCP process, :func:`dicom_node.cli.serve.make_scp_child`),
never a side effect of building an AE: other AEs in a process (a test's receiver, the demo's stand-in
PACS) keep pynetdicom's own negotiation unless they ask for ours.
"""

from __future__ import annotations

from collections.abc import Sequence

import pynetdicom.acse
from pydicom.uid import UID
from pynetdicom import _config, sop_class
from pynetdicom.presentation import PresentationContext, build_context, negotiate_as_acceptor

_installed_syntaxes: tuple[UID, ...] = ()
#: pynetdicom's own hook and switch, as found before the first install (restored by :func:`restore`).
_original: tuple[object, bool] | None = None


def is_unlisted_storage_class(uid: str) -> bool:
    """A private UID, or a public one pynetdicom has no SOP class for (newer than its table)."""
    abstract = UID(uid)
    return abstract.is_private or not hasattr(sop_class, abstract.keyword or "-")


def negotiate(
    rq_contexts: list[PresentationContext],
    ac_contexts: list[PresentationContext],
    roles: dict | None = None,
) -> tuple[list[PresentationContext], list]:
    """pynetdicom's acceptor negotiation, with unlisted abstract syntaxes supported as storage."""
    supported = list(ac_contexts)
    seen = {str(cx.abstract_syntax) for cx in ac_contexts}
    for rq in rq_contexts:
        abstract = str(rq.abstract_syntax)
        if abstract not in seen and is_unlisted_storage_class(abstract):
            supported.append(build_context(abstract, list(_installed_syntaxes)))
            seen.add(abstract)
    return negotiate_as_acceptor(rq_contexts, supported, roles)


def accept_unlisted_storage_classes(transfer_syntaxes: Sequence[str]) -> bool:
    """Make this process's SCPs accept private/unknown storage classes in these syntaxes.

    Process-wide (pynetdicom's hook and switch are module globals), so call it once where a
    process starts serving, not where an AE is built. Idempotent: a second call with the same
    syntaxes changes nothing; one with other syntaxes only replaces the list. Returns True when
    this call installed the negotiation (it was not installed before).
    """
    global _installed_syntaxes, _original
    syntaxes = tuple(UID(uid) for uid in transfer_syntaxes)
    newly = not is_installed()
    if newly:
        _original = (pynetdicom.acse.negotiate_unrestricted, _config.UNRESTRICTED_STORAGE_SERVICE)
    _installed_syntaxes = syntaxes
    pynetdicom.acse.negotiate_unrestricted = negotiate
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    return newly


def is_installed() -> bool:
    """Whether this process negotiates unlisted storage classes (our hook and pynetdicom's switch)."""
    return pynetdicom.acse.negotiate_unrestricted is negotiate and bool(_config.UNRESTRICTED_STORAGE_SERVICE)


def restore() -> None:
    """Put pynetdicom's own negotiation back (for tests that installed ours in their process)."""
    global _installed_syntaxes, _original
    if _original is not None:
        pynetdicom.acse.negotiate_unrestricted, _config.UNRESTRICTED_STORAGE_SERVICE = _original  # type: ignore[assignment]
    _original = None
    _installed_syntaxes = ()
