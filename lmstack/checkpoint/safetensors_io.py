"""safetensors reading: a validated header first, then tensors viewed straight from the mapped file.

Every file of a checkpoint is validated from its header alone (a JSON object; byte ranges that match
dtype x shape and cover the data section back to back, as the format requires) before anything is
allocated, and every error names the file and what is wrong with it. Reading is memory-mapped:
each tensor is viewed from the mapped file, copied once by the caller, and its pages are released
(madvise DONTNEED), so peak RSS stays near the size of the weights rather than twice it.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded; the message names the file and what is wrong with it."""


_MAX_HEADER = 100_000_000  # the safetensors library's own limit on the JSON header


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte range in the file
    end: int


def _header_error(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}")


def read_safetensors_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The validated header of a safetensors file: each tensor's dtype, shape and byte range, and the
    metadata. Reads only the header, so every file of a checkpoint is checked before anything is
    allocated; the checks are the format's (a JSON object; byte ranges that match dtype x shape and
    cover the data section back to back, without holes, overlaps or trailing bytes)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise _header_error(path, "file is empty (0 bytes): not a safetensors file (truncated or never written)")
            if size < 8:
                raise _header_error(path, f"file is truncated ({size} bytes; not a safetensors file)")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > _MAX_HEADER:
                raise _header_error(path, f"header length {n} is over the format's limit of {_MAX_HEADER} bytes: "
                                          "not a safetensors file, or corrupt")
            if 8 + n > size:
                raise _header_error(path, f"header length {n} runs past the end of the file ({size} bytes): truncated")
            raw = f.read(n)
    except FileNotFoundError:
        raise _header_error(path, "file is missing") from None
    except IsADirectoryError:
        raise _header_error(path, "is a directory, not a safetensors file") from None
    except PermissionError as e:
        raise _header_error(path, f"cannot be read ({e.strerror})") from None
    try:
        header = json.loads(raw)
    except ValueError as e:  # includes UnicodeDecodeError
        raise _header_error(path, f"corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise _header_error(path, f"corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise _header_error(path, "corrupt safetensors header (__metadata__ must map strings to strings)")
    base = 8 + n
    infos: dict[str, TensorInfo] = {}
    for name, info in header.items():
        infos[name] = _tensor_info(path, name, info, base)
    end = base
    for name, t in sorted(infos.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if t.start != end:
            raise _header_error(path, f"tensor {name!r} starts at byte {t.start}, expected {end} "
                                      f"({'overlaps the previous tensor' if t.start < end else 'a hole before it'}): corrupt header")
        end = t.end
    if end > size:
        last = max(infos, key=lambda k: infos[k].end)
        raise _header_error(path, f"tensor {last!r} needs bytes up to {end} but the file has {size}: truncated")
    if end < size:
        raise _header_error(path, f"{size - end} bytes after the last tensor that the header does not describe: corrupt")
    return infos, meta


def _tensor_info(path: Path, name: str, info: object, base: int) -> TensorInfo:
    where = f"tensor {name!r}"
    if not isinstance(info, dict):
        raise _header_error(path, f"{where}: header entry is a {type(info).__name__}, not an object")
    dtype = _ST_DTYPES.get(info.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise _header_error(path, f"{where} has unsupported dtype {info.get('dtype')!r}; supported: {sorted(_ST_DTYPES)}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise _header_error(path, f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise _header_error(path, f"{where}: data_offsets {offsets!r} are not two increasing non-negative integers")
    nbytes = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise _header_error(path, f"{where}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, but dtype "
                                  f"{info['dtype']} x shape {shape} needs {nbytes}: corrupt header")
    return TensorInfo(dtype, tuple(shape), base + offsets[0], base + offsets[1])


def iter_safetensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, tensor view into the mapped file). Copy what you keep before the next item."""
    path = Path(path)
    infos, _ = read_safetensors_header(path)
    if not any(t.end > t.start for t in infos.values()):  # nothing to map (mmap refuses a zero-length range)
        for name, t in infos.items():
            yield name, torch.empty(t.shape, dtype=t.dtype)
        return
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mm:
        if len(mm) < max(t.end for t in infos.values()):  # the file shrank after its header was read
            raise _header_error(path, f"file is truncated ({len(mm)} bytes)")
        for name, t in infos.items():
            if t.end == t.start:
                yield name, torch.empty(t.shape, dtype=t.dtype)
                continue
            view = torch.frombuffer(mm, dtype=t.dtype, count=math.prod(t.shape), offset=t.start).view(t.shape)
            yield name, view
            del view
            # Give back the pages of this tensor: we have copied it, and keeping them would double RSS.
            page = mmap.PAGESIZE
            lo = t.start // page * page
            try:
                mm.madvise(mmap.MADV_DONTNEED, lo, t.end - lo)
            except (AttributeError, OSError, ValueError):
                pass


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of one validated safetensors file, copied into memory."""
    return {name: t.clone() for name, t in iter_safetensors(path)}


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: invalid index file ({type(e).__name__}: {e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
        for f in weight_map.values():
            if Path(f).name != f or f in ("", ".", ".."):
                raise CheckpointError(f"{index}: shard {f!r} is not a file name in {d} (paths are refused)")
        files = sorted({d / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index}: shard {f.name} is missing")
        return files
    single = d / "model.safetensors"
    if single.is_file():
        return [single]
    if (d / "pytorch_model.bin").is_file():
        raise CheckpointError(f"{d}: only pytorch_model.bin found; lmstack reads safetensors (re-save with "
                              "safe_serialization=True)")
    raise CheckpointError(f"{d}: no model.safetensors or model.safetensors.index.json")

