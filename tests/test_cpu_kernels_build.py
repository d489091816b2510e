"""The C++ kernel build never hangs silently: a `lock` file left by a killed build is removed with a
warning (PyTorch's builder would wait on it forever), and the extension is keyed by its sources so two
checkouts or versions never share a build directory."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from lmstack import cpu_kernels

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="no C++ compiler")


def test_stale_lock_is_removed_with_a_warning():
    from torch.utils.cpp_extension import _get_build_directory

    if cpu_kernels.load() is None:
        pytest.skip("the kernels do not build here")
    d = _get_build_directory(cpu_kernels.extension_name(), verbose=False)
    with open(os.path.join(d, "lock"), "w"):  # what a build killed with SIGKILL leaves behind
        pass
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
            "from lmstack import cpu_kernels; assert cpu_kernels.load() is not None; print('LOADED')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=os.environ)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "LOADED" in r.stdout and "left by a killed build" in r.stdout
    assert not os.path.exists(os.path.join(d, "lock"))


def test_extension_name_follows_the_sources(tmp_path, monkeypatch):
    name = cpu_kernels.extension_name()
    assert name == cpu_kernels.extension_name() and name.startswith("lmstack_cpu_kernels_")
    src = tmp_path / "csrc"
    shutil.copytree(cpu_kernels._CSRC, src)
    monkeypatch.setattr(cpu_kernels, "_CSRC", src)
    assert cpu_kernels.extension_name() == name  # same bytes, same name
    (src / "simd.h").write_text((src / "simd.h").read_text() + "\n// changed\n")
    assert cpu_kernels.extension_name() != name
