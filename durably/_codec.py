"""The only msgspec encoders and decoders; built once and reused."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from durably.errors import ValidationError

T = TypeVar("T")

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


def encode(value: Any) -> bytes:
    """JSON bytes of ``value``; raises ``TypeError`` for what JSON cannot hold."""
    try:
        return _encoder.encode(value)
    except (msgspec.EncodeError, TypeError, ValueError, OverflowError) as exc:
        raise TypeError(str(exc)) from exc


def decode(data: bytes | str) -> Any:
    """The JSON-native value stored in ``data``."""
    return _decoder.decode(data)


_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


def decode_as(data: bytes | str, type_: type[T] | Any) -> T:
    """``data`` decoded and validated as ``type_``; ``msgspec.ValidationError`` if it does not fit."""
    decoder = _decoders.get(type_)
    if decoder is None:
        decoder = _decoders[type_] = msgspec.json.Decoder(type_)
    return decoder.decode(data)  # type: ignore[no-any-return]


def canonical(value: Any, type_: Any, *, what: str) -> bytes:
    """Validate ``value`` against ``type_`` and return its canonical JSON.

    ``value`` may be an instance of ``type_`` or plain JSON-like data. The JSON
    is what gets stored, so a stored value always decodes as ``type_`` again.
    """
    try:
        data = encode(value)
    except TypeError as exc:
        raise ValidationError(f"{what} cannot be encoded as JSON: {exc}") from exc
    if type_ is Any:
        return data
    try:
        return encode(decode_as(data, type_))
    except msgspec.ValidationError as exc:
        raise ValidationError(f"{what} is invalid: {exc}") from exc
