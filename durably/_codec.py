"""The only msgspec encoders and decoders; built once and reused.

What is stored must come back unchanged (SPEC §5): ``canonical`` refuses a value
that JSON cannot carry faithfully under its declared type, instead of letting
msgspec turn NaN into null, bytes into base64 text, a set into a list or an int
key into a string where the declared type would not turn them back.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, TypeVar

import msgspec
import msgspec.inspect as mi

from durably.errors import ConfigurationError, ValidationError

T = TypeVar("T")

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()

# SQLite's integers are 64-bit; its JSON functions turn larger ones into floats.
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1
# Far deeper than any sane document, far shallower than Python's recursion limit.
MAX_DEPTH = 200

_ENCODE_ERRORS = (msgspec.EncodeError, TypeError, ValueError, OverflowError, RecursionError)


def encode(value: Any) -> bytes:
    """JSON bytes of ``value``; raises ``TypeError`` for what JSON cannot hold."""
    try:
        return _encoder.encode(value)
    except _ENCODE_ERRORS as exc:
        raise TypeError(str(exc)) from exc


def decode(data: bytes | str) -> Any:
    """The JSON-native value stored in ``data``."""
    return _decoder.decode(data)


_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


def decode_as(data: bytes | str, type_: type[T] | Any) -> T:
    """``data`` decoded and validated as ``type_``; ``msgspec.ValidationError`` if it does not fit."""
    try:
        decoder = _decoders.get(type_)
        if decoder is None:
            decoder = _decoders[type_] = msgspec.json.Decoder(type_)
    except (TypeError, ValueError) as exc:  # not a type at all, or one msgspec does not know
        raise ConfigurationError(f"{type_!r} is not a type msgspec can convert to: {exc}") from exc
    return decoder.decode(data)  # type: ignore[no-any-return]


def canonical(value: Any, type_: Any, *, what: str) -> bytes:
    """Validate ``value`` against ``type_`` and return its canonical JSON.

    ``value`` may be an instance of ``type_`` or plain JSON-like data. The JSON
    is what gets stored, so a stored value always decodes as ``type_`` again, and
    to what was given: a value JSON cannot carry faithfully under ``type_``
    raises ``ValidationError`` naming where it is.
    """
    try:
        data = encode(value)
    except TypeError as exc:
        _check_faithful(value, type_, what)  # names the path when it is a value's fault
        raise ValidationError(f"{what} cannot be encoded as JSON: {exc}") from exc
    try:
        back = decode(data) if type_ is Any else decode_as(data, type_)
    except msgspec.ValidationError as exc:
        _check_faithful(value, type_, what)
        raise ValidationError(f"{what} is invalid: {exc}") from exc
    if not _came_back(value, back, data, type_):
        _check_faithful(value, type_, what)
    return data if type_ is Any else encode(back)


# A run of 19 digits may be an integer beyond 64 bits (msgspec writes floats with at most 17
# significant digits). Found by mapping digits to "9" in C: a regex takes 50 times longer.
_DIGITS = bytes(ord("9") if chr(byte).isdigit() and byte < 128 else ord(" ") for byte in range(256))
_LONG_NUMBER = b"9" * 19


def _came_back(value: Any, back: Any, data: bytes, type_: Any) -> bool:
    """The fast path: the round trip gave back ``value`` itself (compared in C), so it is faithful.

    When not (a tuple, plain data for a Struct, a long number), the walk below decides.
    """
    if _LONG_NUMBER in data.translate(_DIGITS):
        return False
    try:
        if back == value:
            return True
        return type_ is not Any and isinstance(value, dict) and msgspec.to_builtins(back) == value
    except RecursionError:
        return False


def _check_faithful(value: Any, type_: Any, what: str) -> None:
    try:
        _Faithful().check(value, _type_info(type_), "$", 0)
    except _Unfaithful as exc:
        raise ValidationError(f"{what} cannot be stored faithfully: {exc}") from None


# --- faithfulness ----------------------------------------------------------------------

_infos: dict[Any, mi.Type] = {}
_ANY = mi.AnyType()
_CONTAINERS = (mi.ListType, mi.VarTupleType, mi.SetType, mi.FrozenSetType)
_OBJECTS = (mi.StructType, mi.DataclassType, mi.TypedDictType)


def _type_info(type_: Any) -> mi.Type:
    try:
        info = _infos.get(type_)
        if info is None:
            info = _infos[type_] = mi.type_info(type_)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"{type_!r} is not a type msgspec can convert to: {exc}") from exc
    return info


class _Unfaithful(Exception):
    """Where and why a value would not come back as given."""


def _fields(value: Any) -> list[tuple[str, Any]] | None:
    """The fields of a Struct or dataclass instance (encoded as a JSON object), else None."""
    if isinstance(value, msgspec.Struct):
        return [(name, getattr(value, name)) for name in value.__struct_fields__]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [(field.name, getattr(value, field.name)) for field in dataclasses.fields(value)]
    return None


class _Faithful:
    """Walks a value beside its declared type; raises ``_Unfaithful`` at the first loss.

    Where the declared type is ``Any`` the value comes back as JSON decodes it, so
    only JSON-native data (str-keyed dicts, lists, str, finite floats, 64-bit ints,
    bool, None; objects of plain data) is faithful there. A typed position is
    checked by msgspec on the round trip; only its nested ``Any`` parts, numbers and
    strings are checked here.
    """

    def check(self, value: Any, info: mi.Type, path: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise _Unfaithful(f"{path}: nested deeper than {MAX_DEPTH} levels")
        while isinstance(info, mi.Metadata):
            info = info.type
        if isinstance(info, mi.UnionType):
            info = self._member(value, info)
        if value is None or isinstance(value, bool):
            return
        if isinstance(value, str):
            self._text(value, path)
        elif isinstance(value, int):
            if not _INT_MIN <= value <= _INT_MAX:
                raise _Unfaithful(f"{path}: the integer {value} is outside the 64-bit range")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise _Unfaithful(f"{path}: {value!r} is not a JSON number (it would become null)")
        elif isinstance(value, dict):
            self._dict(value, info, path, depth)
        elif isinstance(value, (list, tuple, set, frozenset)):
            self._sequence(value, info, path, depth)
        else:
            self._other(value, info, path, depth)

    @staticmethod
    def _member(value: Any, union: mi.UnionType) -> mi.Type:
        """The member of a union that ``value`` is checked against: Any wins, else its kind."""
        if any(isinstance(t, mi.AnyType) for t in union.types):
            return _ANY
        kinds: tuple[type[mi.Type], ...] = (
            (mi.DictType, *_OBJECTS) if isinstance(value, dict) else _CONTAINERS
        )
        return next((t for t in union.types if isinstance(t, kinds)), union)

    @staticmethod
    def _text(value: str, path: str) -> None:
        if not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError:
                raise _Unfaithful(
                    f"{path}: the string {value!r} is not valid Unicode (a lone surrogate)"
                ) from None

    def _dict(self, value: dict[Any, Any], info: mi.Type, path: str, depth: int) -> None:
        if isinstance(info, _OBJECTS):
            fields = {field.encode_name: field.type for field in info.fields}
            for key, item in value.items():
                if key in fields:
                    self.check(item, fields[key], f"{path}.{key}", depth + 1)
            return
        key_info = info.key_type if isinstance(info, mi.DictType) else _ANY
        item_info = info.value_type if isinstance(info, mi.DictType) else _ANY
        for key, item in value.items():
            if not isinstance(key, str) and isinstance(key_info, (mi.AnyType, mi.StrType)):
                raise _Unfaithful(f"{path}: the key {key!r} is not a string (it would become {str(key)!r})")
            where = f"{path}.{key}" if isinstance(key, str) else f"{path}[{key!r}]"
            self.check(key, key_info, f"{where} (key)", depth + 1)
            self.check(item, item_info, where, depth + 1)

    def _sequence(self, value: Any, info: mi.Type, path: str, depth: int) -> None:
        if isinstance(value, (set, frozenset)) and not isinstance(info, _CONTAINERS):
            raise _Unfaithful(f"{path}: a {type(value).__name__} is not JSON (it would become a list)")
        if isinstance(info, mi.TupleType):
            items = info.item_types
        elif isinstance(info, mi.NamedTupleType):
            items = tuple(field.type for field in info.fields)
        else:
            item = info.item_type if isinstance(info, _CONTAINERS) else _ANY
            items = (item,) * len(value)
        for index, (element, element_info) in enumerate(zip(value, items, strict=False)):
            self.check(element, element_info, f"{path}[{index}]", depth + 1)

    def _other(self, value: Any, info: mi.Type, path: str, depth: int) -> None:
        fields = _fields(value)
        if fields is not None:
            # Typed as its own class: its field types apply; under Any it becomes plain JSON.
            types: dict[str, mi.Type] = {}
            if isinstance(info, _OBJECTS) and info.cls is type(value):
                types = {field.name: field.type for field in info.fields}
            for name, item in fields:
                self.check(item, types.get(name, _ANY), f"{path}.{name}", depth + 1)
        elif isinstance(info, mi.AnyType):
            raise _Unfaithful(
                f"{path}: a {type(value).__name__} is not JSON-native; under an untyped (Any) position"
                " it would come back changed (declare a type that carries it, or convert it)"
            )
