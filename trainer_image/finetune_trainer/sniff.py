"""What a file's first bytes say when it is not UTF-8 text: UTF-16/32 (a byte-order mark or
the NUL pattern of one), a compressed or binary format, or other bytes that are not UTF-8.

Used wherever a user's file is read as text (spec files, JSON lines, CSV) so that a wrong
encoding is one clear message for the whole file instead of an error on every line.
"""

from __future__ import annotations

import codecs

#: How many leading bytes `sniff` looks at.
HEAD_BYTES = 4096

_BOMS = (  # UTF-32 first: its little-endian mark starts with UTF-16's
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)
_MAGIC = (
    (b"\x1f\x8b", "a gzip-compressed file; give it a .gz suffix"),
    (b"BZh", "a bzip2-compressed file; give it a .bz2 suffix"),
    (b"\xfd7zXZ\x00", "an xz-compressed file; give it an .xz suffix"),
    (b"\x28\xb5\x2f\xfd", "a zstd-compressed file; give it a .zst suffix"),
    (b"PAR1", "a Parquet file; give it a .parquet suffix"),
    (b"PK\x03\x04", "a zip archive; unpack it"),
    (b"GGUF", "a GGUF model file, not data"),
    (b"%PDF", "a PDF document, not data"),
)
SAVE_AS_UTF8 = "save it as UTF-8"


def _nul_pattern(head: bytes) -> str | None:
    """UTF-16/32 text without a byte-order mark: NULs in a regular pattern (ASCII-heavy)."""
    sample = head[: len(head) - len(head) % 4]
    if len(sample) < 8 or b"\x00" not in sample:
        return None
    quads = [sample[i : i + 4] for i in range(0, len(sample), 4)]
    if sum(q[1:] == b"\x00\x00\x00" or q[:3] == b"\x00\x00\x00" for q in quads) > len(quads) // 2:
        return "UTF-32"
    even = sample[0::2].count(0)
    odd = sample[1::2].count(0)
    half = len(sample) // 4  # NUL in at least half of one byte position's slots
    if (odd >= half and even == 0) or (even >= half and odd == 0):
        return "UTF-16"
    return None


def describe(head: bytes) -> str | None:
    """Why bytes starting with `head` are not UTF-8 text, as words ending in what to do;
    None when they may well be UTF-8 text (a UTF-8 byte-order mark is fine)."""
    for bom, name in _BOMS:
        if head.startswith(bom):
            return f"this file is {name} (byte-order mark); {SAVE_AS_UTF8}"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return f"this is {what}"
    encoding = _nul_pattern(head)
    if encoding is not None:
        return (
            f"this file looks like {encoding} text (NUL bytes between characters); {SAVE_AS_UTF8}"
        )
    if b"\x00" in head:
        return "this is a binary file, not text"
    return None


def not_utf8(data: bytes, error: UnicodeDecodeError) -> str:
    """Words for `data` that failed to decode as UTF-8 with `error`."""
    found = describe(data[:HEAD_BYTES])
    if found is not None:
        return found
    line = data[: error.start].count(b"\n") + 1
    byte = data[error.start : error.start + 1].hex()
    return f"not UTF-8 text (byte 0x{byte} on line {line}); {SAVE_AS_UTF8}"
