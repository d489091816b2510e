"""Find or build llama.cpp's own server (`llama-server`) for the serving anchor.

llama-cpp-python's sdist vendors the llama.cpp sources its wheel was built from, so the same
version that tests/test_gguf*.py use as the tokenizer / logits reference is the one benchmarked.
Built once with cmake (CPU, GGML_NATIVE, static, no web UI, no OpenSSL), cached outside the repo in
~/.cache/lmstack/llama-server-<version>/bin/llama-server (~6 min on 2 cores). A machine that cannot
build it gets None and a reason; the benchmark then skips the llama-server column.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

VERSION = "0.3.36"  # = the llama-cpp-python pin in pyproject.toml's test extra
CACHE = Path(os.environ.get("LMSTACK_CACHE", Path.home() / ".cache" / "lmstack")) / f"llama-server-{VERSION}"


def _run(cmd: list[str], log: Path) -> None:
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True)


def find_or_build() -> tuple[Path | None, str]:
    """(path to llama-server, "") or (None, why not)."""
    exe = CACHE / "bin" / "llama-server"
    if exe.is_file():
        return exe, ""
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            return None, f"{tool} not found"
    CACHE.mkdir(parents=True, exist_ok=True)
    log = CACHE / "build.log"
    try:
        sdist = CACHE / f"llama_cpp_python-{VERSION}.tar.gz"
        if not sdist.is_file():
            _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-d", str(CACHE),
                  f"llama-cpp-python=={VERSION}"], log)
        src = CACHE / "llama.cpp"
        if not (src / "CMakeLists.txt").is_file():
            prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
            with tarfile.open(sdist) as tf:
                members = [m for m in tf.getmembers() if m.name.startswith(prefix) and m.isreg()]
                for m in members:
                    m.name = m.name[len(prefix):]
                tf.extractall(src, members=members, filter="data")
        build = CACHE / "build"
        print(f"building llama-server {VERSION} (once; log: {log}) ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        _run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",
              "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
              "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DGGML_NATIVE=ON"], log)
        _run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 2)], log)
        exe.parent.mkdir(exist_ok=True)
        shutil.copy2(build / "bin" / "llama-server", exe)
        print(f"built llama-server in {time.monotonic() - t0:.0f} s", file=sys.stderr)
        return exe, ""
    except (subprocess.CalledProcessError, OSError, tarfile.TarError) as e:
        return None, f"building llama-server failed ({e}); see {log}"
