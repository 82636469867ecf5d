"""The entry envelope: the header of entries written with stale-while-revalidate or
early refresh.

Such an entry is this module's marker byte, then the logical expiry (Unix time)
and the time its value took to compute (seconds) as two little-endian doubles,
then the codec's payload. Codec payloads never start with the marker byte, so a
reader tells enveloped entries from plain ones by their first byte.
"""

from __future__ import annotations

import struct
import time
from typing import Final

__all__ = ["ENVELOPE", "ENVELOPE_BYTE", "META", "wrap", "strip"]

#: The marker byte opening an enveloped entry.
ENVELOPE: Final = b"\x05"
#: The marker as an int, for ``payload[0] == ENVELOPE_BYTE``.
ENVELOPE_BYTE: Final = ENVELOPE[0]
#: The header after the marker: logical expiry and compute time.
META: Final = struct.Struct("<dd")


def wrap(payload: bytes, seconds: float, delta: float, now: float | None = None) -> bytes:
    """``payload`` in an envelope expiring ``seconds`` after ``now`` (Unix time; the
    current time by default), computed in ``delta`` seconds."""
    return ENVELOPE + META.pack((time.time() if now is None else now) + seconds, delta) + payload


def strip(payload: bytes) -> bytes:
    """The codec payload inside an (optional) envelope."""
    if payload[:1] == ENVELOPE:
        return payload[META.size + 1 :]
    return payload
