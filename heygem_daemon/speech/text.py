"""A script file as people save it -> its text, or a refusal naming what to do.

Order of detection: a byte-order mark (UTF-8, UTF-16 as Windows Notepad's "Unicode" writes it, UTF-32),
then strict UTF-8, then GB18030 (Chinese Windows' ANSI; a superset of GBK and GB2312) when what it
decodes to reads as text. Anything else is refused: guessing an encoding would read a script out wrong.
Pure functions: intake's probe children and the worker's speech step both use them.
"""

from __future__ import annotations

import codecs
import unicodedata
from pathlib import Path

SAVE_AS = "save it as UTF-8 text (Notepad: File > Save as > Encoding: UTF-8) and drop it again"
_BOMS = (  # UTF-32 first: its little-endian mark begins with UTF-16's
    (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"),
)
_TEXT_CONTROLS = frozenset("\t\n\r\f\v")
# GB18030 maps almost any bytes to some character. Chinese text saved by Windows is mostly GB2312's
# characters, whose two bytes are both >= 0xA1; Latin-1 or Windows-1252 text read as GB18030 pairs an
# accented letter with the ASCII letter after it (a second byte below 0x80) or makes 4-byte rarities.
_GB_ODD_SHARE = 0.2


class ScriptError(Exception):
    """A script that cannot be read out: `reason` says what is wrong, `hint` what to do."""

    def __init__(self, reason: str, hint: str = SAVE_AS, incomplete: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.hint, self.incomplete = reason, hint, incomplete


def read_script(path: Path, max_chars: int) -> str:
    """The text of a script file, refused when empty, binary, in an unknown encoding or over `max_chars`."""
    with open(path, "rb") as fh:
        # Four bytes a character at most in any encoding accepted here, plus a mark.
        raw = fh.read(max_chars * 4 + 4 + 1)
    if len(raw) > max_chars * 4 + 4:
        raise _too_long(path.name, max_chars)
    return decode_script(raw, path.name, max_chars)


def decode_script(raw: bytes, name: str, max_chars: int) -> str:
    if not raw:
        raise ScriptError(f"{name} is empty", "write the script into the file and drop it again", incomplete=True)
    text = _decode(raw, name)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    bad = next((c for c in text if unicodedata.category(c) == "Cc" and c not in _TEXT_CONTROLS), None)
    if bad is not None:
        raise ScriptError(f"{name} is not a text file (it holds the control character U+{ord(bad):04X})",
                          "drop a plain .txt file with the words to be spoken")
    text = text.strip()
    if not text:
        raise ScriptError(f"{name} holds no words (only blank space)", "write the script into the file")
    if len(text) > max_chars:
        raise _too_long(name, max_chars, len(text))
    return text


def _decode(raw: bytes, name: str) -> str:
    for bom, encoding in _BOMS:
        if raw.startswith(bom):
            try:
                return raw.decode(encoding).lstrip("\ufeff")
            except UnicodeDecodeError:
                raise ScriptError(f"{name} starts with a {encoding.upper()} byte-order mark but is not "
                                  f"valid {encoding.upper()}", SAVE_AS) from None
    if b"\x00" in raw:
        raise ScriptError(f"{name} is not UTF-8 or GB18030 text: it holds zero bytes (binary data, or UTF-16 "
                          "saved without a byte-order mark)", SAVE_AS)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        text = raw.decode("gb18030")
    except UnicodeDecodeError:
        text = ""
    if text and _reads_as_text(text):
        return text
    raise ScriptError(f"{name} is in an encoding the daemon cannot tell for sure (not UTF-8, UTF-16 with a "
                      "byte-order mark, or GB18030/GBK)", SAVE_AS)


def _reads_as_text(text: str) -> bool:
    wide = [c for c in text if not c.isascii()]
    odd = sum(1 for c in wide if _odd_gb(c.encode("gb18030")))
    return odd <= _GB_ODD_SHARE * len(wide)


def _odd_gb(encoded: bytes) -> bool:
    return len(encoded) != 2 or encoded[1] < 0x80 or unicodedata.category(encoded.decode("gb18030")) == "Co"


def _too_long(name: str, max_chars: int, chars: int | None = None) -> ScriptError:
    size = f"{chars} characters" if chars is not None else "more characters"
    return ScriptError(f"{name} has {size}; scripts may have at most {max_chars} (limits.max_script_chars)",
                       "split the script into several files (one video each), or raise limits.max_script_chars")
