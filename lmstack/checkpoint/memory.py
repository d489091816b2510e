"""How much memory a load may take: checked before allocating, so a model that cannot fit is refused
with its computed size instead of a failed multi-terabyte allocation (or the OOM killer)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from lmstack.config import ConfigError


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None  # absent, or "max" (no limit)


def available_memory(device: str | torch.device) -> int | None:
    """Bytes a load can still allocate on `device`, or None where that is unknown (then nothing is refused).

    CPU: MemAvailable + SwapFree (what the kernel can hand out without killing anyone), capped by a
    cgroup v2 memory limit (containers see the host's /proc/meminfo); CUDA: the device's free memory."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    if dev.type != "cpu":
        return None
    try:
        info = {k: int(v.split()[0]) * 1024 for k, v in
                (line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)}
        avail: int | None = info["MemAvailable"] + info.get("SwapFree", 0)
    except (OSError, KeyError, ValueError):
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, OSError, ValueError):
            avail = None
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        avail = limit - used if avail is None else min(avail, limit - used)
    return avail


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n < 2**50 else f"{n / 2**40:,.0f} TiB"


def check_fits_in_memory(nbytes: int, device: str | torch.device, what: str) -> None:
    """Refuse, before allocating, a load of `nbytes` that `device` cannot hold; `what` says whose bytes."""
    avail = available_memory(device)
    if avail is not None and nbytes > avail:
        raise ConfigError(f"{what} need {_gib(nbytes)}, but {torch.device(device).type} memory has "
                          f"{_gib(max(avail, 0))} available: refusing to allocate the model")

