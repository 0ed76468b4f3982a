"""Write a model card as the TOML that `shoal_shared.model_card.parse_card` reads.

A card is flat fields plus [sampling]: strings, integers, floats, booleans and arrays of
strings. That subset is small enough to serialize here rather than take a TOML writer
dependency for it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Final, cast

from shoal_shared.model_card import ModelCard, parse_card

_BARE_KEY: Final = re.compile(r"^[A-Za-z0-9_-]+$")
_ESCAPES: Final[Mapping[str, str]] = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _string(text: str) -> str:
    """A TOML basic string. Control characters (and DEL) may not appear raw in one."""
    escaped: list[str] = []
    for character in text:
        if character in _ESCAPES:
            escaped.append(_ESCAPES[character])
        elif ord(character) < 0x20 or ord(character) == 0x7F:
            escaped.append(f"\\u{ord(character):04x}")
        else:
            escaped.append(character)
    return '"' + "".join(escaped) + '"'


def _value(value: object) -> str:
    # bool before int: True is an int too.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list | tuple):
        items = cast(list[object] | tuple[object, ...], value)
        return "[" + ", ".join(_value(item) for item in items) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__} in a model card")


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _string(key)


def card_toml(card: ModelCard, *, comment: str | None = None) -> str:
    """The card as TOML; absent optional fields (hf_repo of a local model) are left out."""
    fields = card.model_dump(mode="json", exclude_none=True)
    lines = [f"# {line}" for line in (comment or "").splitlines()]
    tables: list[tuple[str, Mapping[str, object]]] = []
    for key, value in fields.items():
        if isinstance(value, dict):
            tables.append((key, cast(Mapping[str, object], value)))
        else:
            lines.append(f"{_key(key)} = {_value(value)}")
    for name, table in tables:
        lines += ["", f"[{_key(name)}]"]
        lines += [f"{_key(key)} = {_value(value)}" for key, value in table.items()]
    text = "\n".join(lines) + "\n"
    # A card that does not read back as itself would be skipped, with a warning, by every
    # node that scans the models directory: better to fail the import now.
    if parse_card(text, card.model_id) != card:
        raise ValueError(f"{card.model_id}: the card does not round-trip through TOML")
    return text
