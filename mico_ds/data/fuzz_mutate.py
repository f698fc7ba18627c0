"""Mutations of encoded members for the decoders' fuzzing harness (``mico_ds.data.fuzz``).

A mutation is a list of :data:`Op` ``(name, where, value)``: ``where`` in [0, 1] picks a position (or a
header field), ``value`` a byte, a length or a magnitude. Ops are plain data, so the same mutation can
come from hypothesis strategies (tests/unit/data/test_fuzz_decode.py) or from a seeded numpy generator
(:func:`random_ops`, tools/fuzz_decoders.py), and a failing input is reproduced from its ops alone.

``header`` ops are format-aware: they rewrite a size field the decoders read before decoding (PNG
IHDR with its CRC fixed, JPEG SOF, GIF screen, WAV fmt/data, FLAC STREAMINFO, the ``.npy`` shape, MP4
tkhd/stsz/mdhd/avc1, WebM pixel sizes, tar member size with its checksum fixed), with oversized,
zero, maximal or random values -- the inputs a cap must refuse before allocating.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Callable, Sequence

import numpy as np

Op = tuple[str, float, int]
OPS: tuple[str, ...] = ("flip", "byte", "interesting", "truncate", "insert", "delete", "duplicate", "header")
INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)
BIG_SIDES = (60_000, 65_535, 1 << 20, 0x7FFFFFFF)  # a 60,000 x 60,000 PNG, 16-bit maxima, int32 max


def _pos(data: bytes | bytearray, where: float) -> int:
    return min(len(data) - 1, max(0, int(where * len(data)))) if data else 0


def _magnitude(value: int, bits: int) -> int:
    """A header value: zero, one, a big side, the field's maximum, or a random one (by ``value``)."""
    top = (1 << bits) - 1
    choice = value % 5
    if choice == 0:
        return 0
    if choice == 1:
        return 1
    if choice == 2:
        return min(top, BIG_SIDES[(value >> 3) % len(BIG_SIDES)])
    if choice == 3:
        return top
    return (value >> 3) & top


# ----------------------------------------------------------------------------- header fields


def _put(d: bytearray, off: int, fmt: str, value: int) -> bool:
    size = struct.calcsize(fmt)
    if off < 0 or off + size > len(d):
        return False
    bits = 8 * size
    d[off : off + size] = struct.pack(fmt, value & ((1 << bits) - 1))
    return True


def _png(d: bytearray, which: int, value: int) -> bool:
    if d[:8] != b"\x89PNG\r\n\x1a\n" or d[12:16] != b"IHDR":
        return False
    _put(d, 16 + 4 * (which % 2), ">I", _magnitude(value, 31))
    if which % 3 == 0:  # sometimes both sides (a 60,000 x 60,000 bomb)
        _put(d, 16 + 4 * ((which + 1) % 2), ">I", _magnitude(value, 31))
    d[29:33] = struct.pack(">I", zlib.crc32(bytes(d[12:29])))  # Pillow checks the CRC
    return True


def _jpeg(d: bytearray, which: int, value: int) -> bool:
    m = re.search(rb"\xff[\xc0-\xc3]", d)
    if d[:2] != b"\xff\xd8" or m is None:
        return False
    return _put(d, m.start() + 5 + 2 * (which % 2), ">H", _magnitude(value, 16))


def _gif(d: bytearray, which: int, value: int) -> bool:
    if d[:3] != b"GIF":
        return False
    i = d.find(b"\x2c", 13)  # the first image descriptor (its own size), else the logical screen
    off = 6 + 2 * (which % 2) if which % 4 < 2 or i < 0 else i + 5 + 2 * (which % 2)
    return _put(d, off, "<H", _magnitude(value, 16))


def _wav(d: bytearray, which: int, value: int) -> bool:
    f, data = d.find(b"fmt "), d.find(b"data")
    if d[:4] != b"RIFF" or f < 0:
        return False
    field = which % 4
    if field == 0:
        return _put(d, f + 10, "<H", _magnitude(value, 16))  # channels
    if field == 1:
        return _put(d, f + 12, "<I", _magnitude(value, 32))  # sample rate
    if field == 2 and data >= 0:
        return _put(d, data + 4, "<I", _magnitude(value, 32))  # data size
    return _put(d, 4, "<I", _magnitude(value, 32))  # RIFF size


def _flac(d: bytearray, which: int, value: int) -> bool:
    if d[:4] != b"fLaC" or len(d) < 26:
        return False
    x = int.from_bytes(d[18:26], "big")  # sample rate (20) | channels-1 (3) | bps-1 (5) | samples (36)
    if which % 3 == 0:
        x = (x & ~(((1 << 20) - 1) << 44)) | (_magnitude(value, 20) << 44)
    elif which % 3 == 1:
        x = (x & ~((1 << 36) - 1)) | _magnitude(value, 36)  # e.g. ten hours, or 0: "unknown"
    else:
        x = (x & ~(0x7 << 41)) | ((value & 0x7) << 41)
    d[18:26] = x.to_bytes(8, "big")
    return True


def _npy(d: bytearray, which: int, value: int) -> bool:
    if d[:6] != b"\x93NUMPY" or len(d) < 10 or d[6] != 1:
        return False
    hlen = int.from_bytes(d[8:10], "little")
    text = bytes(d[10 : 10 + hlen])
    m = re.search(rb"'shape': \([^)]*\)", text)
    if m is None:
        return False
    side = _magnitude(value, 31)
    sides = ([side], [side, side], [side, _magnitude(value >> 7, 31), 1 + (value >> 14) % 4])[which % 3]
    shape = b"(" + b", ".join(b"%d" % s for s in sides) + (b",)" if len(sides) == 1 else b")")
    new = (text[: m.start()] + b"'shape': " + shape + text[m.end() :]).rstrip(b" \n")
    if len(new) + 1 > hlen:
        return False
    d[10 : 10 + hlen] = new + b" " * (hlen - len(new) - 1) + b"\n"  # the header keeps its length
    return True


_MP4_FIELDS = ((b"tkhd", 76, ">I"), (b"tkhd", 80, ">I"), (b"stsz", 8, ">I"), (b"mdhd", 12, ">I"),
               (b"mdhd", 16, ">I"), (b"avc1", 24, ">H"), (b"avc1", 26, ">H"), (b"stts", 8, ">I"),
               (b"mvhd", 12, ">I"), (b"mvhd", 16, ">I"))  # fmt: skip


def _mp4(d: bytearray, which: int, value: int) -> bool:
    if d[4:8] != b"ftyp":
        return False
    box, off, fmt = _MP4_FIELDS[which % len(_MP4_FIELDS)]
    i = d.find(box)
    return i >= 0 and _put(d, i + 4 + off, fmt, _magnitude(value, 8 * struct.calcsize(fmt)))


def _webm(d: bytearray, which: int, value: int) -> bool:
    if d[:4] != b"\x1a\x45\xdf\xa3":
        return False
    elem = (b"\xb0", b"\xba")[which % 2]  # PixelWidth / PixelHeight
    m = re.search(re.escape(elem) + rb"[\x81\x82]", d)
    if m is None:
        return False
    n = d[m.start() + 1] - 0x80
    return _put(d, m.start() + 2, ">B" if n == 1 else ">H", _magnitude(value, 8 * n))


def _tar(d: bytearray, which: int, value: int) -> bool:
    if len(d) < 1024 or d[257:262] != b"ustar":
        return False
    headers, off = [], 0
    while off + 512 <= len(d) and d[off + 257 : off + 262] == b"ustar":
        headers.append(off)
        try:
            size = int(bytes(d[off + 124 : off + 136]).strip(b"\x00 ") or b"0", 8)
        except ValueError:  # an earlier op broke this size field: stop at this member
            break
        off += 512 + -(-size // 512) * 512
    h = headers[which % len(headers)]
    field = (which >> 4) % 3
    if field == 0:  # member size, e.g. claiming gigabytes
        d[h + 124 : h + 136] = b"%011o\x00" % min(_magnitude(value, 33), 0o77777777777)
    elif field == 1:  # the member name's extension
        name = bytes(d[h : h + 100]).rstrip(b"\x00")
        ext = (b"jpg", b"png", b"mp4", b"webm", b"gif", b"flac", b"wav", b"mp3", b"json", b"txt")[value % 10]
        d[h : h + 100] = (name.split(b".", 1)[0] + b"." + ext).ljust(100, b"\x00")[:100]
    else:  # the type flag (directories, links, ... are not members)
        d[h + 156] = b"0123456"[value % 7]
    d[h + 148 : h + 156] = b" " * 8
    d[h + 148 : h + 156] = b"%06o\x00 " % sum(d[h : h + 512])  # tarfile verifies the checksum
    return True


HEADERS: tuple[Callable[[bytearray, int, int], bool], ...] = (
    _png, _jpeg, _gif, _wav, _flac, _npy, _mp4, _webm, _tar,
)  # fmt: skip


# ----------------------------------------------------------------------------- applying ops


def apply_ops(data: bytes, ops: Sequence[Op]) -> bytes:
    """``data`` after ``ops``, in order (an op that does not apply leaves the data unchanged)."""
    d = bytearray(data)
    for name, where, value in ops:
        where = min(1.0, max(0.0, float(where)))
        value = int(value) & 0xFFFFFFFF
        if name == "header":
            which = int(where * 64)
            for fix in HEADERS:
                if fix(d, which, value):
                    break
            continue
        if not d and name != "insert":
            continue
        p = _pos(d, where)
        if name == "flip":
            d[p] ^= 1 << (value % 8)
        elif name == "byte":
            d[p] = value & 0xFF
        elif name == "interesting":
            v = INTERESTING[value % len(INTERESTING)]
            width = (1, 2, 4)[(value >> 4) % 3]
            order = "big" if (value >> 6) & 1 else "little"
            d[p : p + width] = (v & ((1 << 8 * width) - 1)).to_bytes(width, order)
        elif name == "truncate":
            del d[p:]
        elif name == "insert":
            n = 1 + value % 64
            d[p:p] = np.random.default_rng(value).integers(0, 256, n, dtype=np.uint8).tobytes()
        elif name == "delete":
            del d[p : p + 1 + value % 256]
        elif name == "duplicate":
            n = 1 + value % 512
            d[p:p] = d[p : p + n]
        else:
            raise ValueError(f"unknown mutation {name!r}; known: {OPS}")
    return bytes(d)


def random_ops(rng: np.random.Generator, max_ops: int = 4) -> list[Op]:
    """A mutation drawn from ``rng``: 1 to ``max_ops`` ops, a header op one time in four."""
    n = int(rng.integers(1, max_ops + 1))
    names = ["header" if rng.random() < 0.25 else OPS[int(rng.integers(len(OPS) - 1))] for _ in range(n)]
    return [(name, float(rng.random()), int(rng.integers(0, 1 << 32))) for name in names]
