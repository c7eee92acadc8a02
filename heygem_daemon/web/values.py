"""Numbers from a request (query values, headers): plain decimal digits only. Python's int() would also
take `1_000`, `+5` and ` 7 `, and a huge page number overflows SQLite's integers."""

from __future__ import annotations

import re

DIGITS = re.compile(r"[0-9]{1,18}")
"""At most 18 digits: every such number fits a signed 64-bit integer."""


class BadValue(ValueError):
    def __init__(self, name: str, given: str, wanted: str) -> None:
        shown = given if len(given) <= 40 else given[:40] + "…"
        super().__init__(f"{name} {shown!r} is not {wanted}")


def whole_number(name: str, given: str, low: int = 0, high: int = 10**18 - 1) -> int:
    """`given` as an int in [low, high], or BadValue naming `name`."""
    wanted = f"a whole number from {low} to {high}"
    if not DIGITS.fullmatch(given):
        raise BadValue(name, given, wanted)
    number = int(given)
    if not low <= number <= high:
        raise BadValue(name, given, wanted)
    return number
