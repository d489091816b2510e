"""keep_freed_memory must reach glibc: mallopt answers 1 only for a parameter number and value it
accepts, so a wrong parameter constant fails here (the speed effect is measured in benchmarks/)."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest


@pytest.mark.skipif(platform.system() != "Linux" or not platform.libc_ver()[0].startswith("glibc"),
                    reason="glibc only")
def test_keep_freed_memory_is_accepted_by_glibc():
    child = "from lmstack.malloc import keep_freed_memory as k; print(k(), k())"  # second call: idempotent
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]
