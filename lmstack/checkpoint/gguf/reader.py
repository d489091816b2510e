"""Opening a GGUF file, after checking what its header claims against the file itself.

The `gguf` package's reader trusts the header: a count of 2^62 tensors, a string longer than the
file, or a tensor whose data runs past the end surface as an IndexError or a failed reshape deep
inside it. `check_gguf` walks the header first (magic, version, every key and tensor record, the
data offsets and sizes) and raises a GGUFError naming the file, the record and what is wrong.
"""
from __future__ import annotations

import mmap
import struct
from pathlib import Path

from lmstack.checkpoint.gguf.errors import GGUFError, gguf_module

_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS


class _Cursor:
    def __init__(self, data: mmap.mmap, path: Path) -> None:
        self.data, self.pos, self.path = data, 0, path

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.data):
            raise GGUFError(f"{self.path}: {what} needs {n} bytes at offset {self.pos}, but the file has "
                            f"{len(self.data)} bytes (truncated or corrupt)")

    def take(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        self.need(size, what)
        v = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return v[0] if len(v) == 1 else v

    def string(self, what: str) -> str:
        n = self.take("<Q", what)
        self.need(n, f"{what} ({n}-byte string)")
        s = bytes(self.data[self.pos: self.pos + n])
        self.pos += n
        try:
            return s.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{self.path}: {what} is not valid UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype in _SCALAR:
            fmt = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[_SCALAR[vtype]]
            return self.take(fmt, what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY and depth < 2:
            etype, count = self.take("<I", what), self.take("<Q", what)
            if etype in _SCALAR:
                self.need(count * _SCALAR[etype], f"{what} ({count} values)")
                self.pos += count * _SCALAR[etype]
                return None
            self.need(count * 8, f"{what} ({count} entries)")  # every string / array entry has an 8-byte length
            for i in range(count):
                self.value(etype, f"{what}[{i}]", depth + 1)
            return None
        raise GGUFError(f"{self.path}: {what} has value type {vtype}, which GGUF does not define")


def check_gguf(path: Path) -> None:
    """Raises GGUFError (naming the file and the problem) unless the header is consistent with the file."""
    if path.stat().st_size < 24:
        raise GGUFError(f"{path}: {path.stat().st_size} bytes is too short for a GGUF header (truncated or not GGUF)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        _check(data, path)


def _check(data: mmap.mmap, path: Path) -> None:
    gguf = gguf_module()
    c = _Cursor(data, path)
    c.need(4, "the GGUF magic")
    if data[:4] != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (starts with {data[:4]!r}, expected b'GGUF')")
    c.pos = 4
    version = c.take("<I", "the version")
    if version not in (2, 3):
        raise GGUFError(f"{path}: GGUF version {version} is not supported (2 and 3 are; a big-endian file reads "
                        "as a huge version)")
    n_tensors, n_kv = c.take("<Q", "the tensor count"), c.take("<Q", "the key count")
    left = len(data) - c.pos
    if n_kv * 13 > left or n_tensors * 33 > left:  # smallest record: 13 bytes per key, 33 per tensor
        raise GGUFError(f"{path}: the header claims {n_kv} keys and {n_tensors} tensors, more than the "
                        f"{len(data)}-byte file can hold (corrupt header)")
    alignment = 32
    for i in range(n_kv):
        key = c.string(f"key #{i}")
        vtype = c.take("<I", f"key {key!r}")
        v = c.value(vtype, f"key {key!r}")
        if key == "general.alignment":
            if not isinstance(v, int) or v <= 0 or v & (v - 1):
                raise GGUFError(f"{path}: general.alignment {v!r} is not a power of two")
            alignment = v
    infos = []
    seen: set[str] = set()
    for i in range(n_tensors):
        name = c.string(f"tensor #{i}'s name")
        if name in seen:
            raise GGUFError(f"{path}: tensor {name!r} appears twice")
        seen.add(name)
        n_dims = c.take("<I", f"tensor {name!r}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise GGUFError(f"{path}: tensor {name!r} has {n_dims} dimensions (GGML allows 1 to {_MAX_DIMS})")
        dims = [c.take("<Q", f"tensor {name!r}'s shape") for _ in range(n_dims)]
        ttype, offset = c.take("<I", f"tensor {name!r}'s type"), c.take("<Q", f"tensor {name!r}'s offset")
        infos.append((name, dims, ttype, offset))
    data_start = -(-c.pos // alignment) * alignment
    for name, dims, ttype, offset in infos:
        try:
            qt = gguf.GGMLQuantizationType(ttype)
            block, size = gguf.GGML_QUANT_SIZES[qt]
        except (ValueError, KeyError):
            raise GGUFError(f"{path}: tensor {name!r} has type id {ttype}, which GGML does not define") from None
        if any(d == 0 for d in dims) or dims[0] % block:
            raise GGUFError(f"{path}: tensor {name!r} ({qt.name}) has shape {dims} (GGML order); rows must be a "
                            f"non-empty multiple of its {block}-value blocks")
        n = 1
        for d in dims:
            n *= d
        nbytes = n // block * size
        if offset % alignment:
            raise GGUFError(f"{path}: tensor {name!r}'s data offset {offset} is not a multiple of the alignment "
                            f"{alignment}")
        if data_start + offset + nbytes > len(data):
            raise GGUFError(f"{path}: tensor {name!r} ({qt.name}, shape {dims}) needs {nbytes} bytes at offset "
                            f"{data_start + offset}, past the end of the {len(data)}-byte file (truncated)")


def open_gguf(path: str | Path):
    """A checked gguf.GGUFReader for path."""
    gguf = gguf_module()
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    check_gguf(path)
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # what check_gguf does not model; the reader raises bare ValueError / IndexError
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
