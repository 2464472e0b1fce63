"""Run ids that sort by creation time: 48-bit milliseconds + 80 random bits (ULID)."""

from __future__ import annotations

import os

from durably import _clock

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_last_ms = -1
_last_random = 0


def new_run_id() -> str:
    """A 26-character Crockford base32 id, monotonic within this process."""
    global _last_ms, _last_random
    ms = int(_clock.now() * 1000)
    if ms <= _last_ms:
        # Same millisecond (or a clock step back): keep order by counting up.
        ms = _last_ms
        _last_random += 1
    else:
        _last_random = int.from_bytes(os.urandom(10), "big") >> 1
    _last_ms = ms
    value = (ms << 80) | (_last_random & ((1 << 80) - 1))
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))
