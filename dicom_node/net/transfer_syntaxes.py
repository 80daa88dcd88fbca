"""Transfer syntaxes the SCP accepts: every one whose pixel data we can decode.

Uncompressed syntaxes are always accepted. Compressed ones are offered only when pydicom has a
working decoder for them in this installation (pylibjpeg + libjpeg for JPEG and JPEG-LS, openjpeg
for JPEG 2000 and HTJ2K, pydicom's own RLE decoder), so a sender whose study we could not analyse
falls back to a syntax we can read instead of us storing bytes nobody can open.
"""

from __future__ import annotations

from pydicom.pixels import get_decoder
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

#: Native (uncompressed) encodings, in our order of preference (first = most efficient to parse).
UNCOMPRESSED: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)

#: Compressed encodings we accept when a decoder is installed. Lossless first.
COMPRESSED: tuple[UID, ...] = (
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEG2000Lossless,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    JPEG2000,
    HTJ2K,
)


def has_pixel_decoder(transfer_syntax_uid: UID) -> bool:
    """True when pydicom can decode pixel data encoded with this transfer syntax here."""
    try:
        return bool(get_decoder(transfer_syntax_uid).is_available)
    except NotImplementedError:  # pydicom has no decoder class for this syntax at all
        return False


def accepted_transfer_syntaxes() -> list[UID]:
    """All transfer syntaxes the SCP offers for storage SOP classes, uncompressed first."""
    return [*UNCOMPRESSED, *(uid for uid in COMPRESSED if has_pixel_decoder(uid))]
