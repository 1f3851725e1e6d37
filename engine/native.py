"""The engine's C++ ops (csrc/: paged decode attention, fused elementwise ops), compiled on
first use and cached.

Like numba's cache for the LoRA kernel, the shared library is built once per machine into
`$LORAFLEET_NATIVE_DIR`, else `$LORAFLEET_CACHE_DIR/native` (default `~/.cache/lorafleet/native`),
named by a hash of its source and of how torch is built, and loaded with
`torch.ops.load_library`. It links torch's own libraries, OpenMP runtime included, so its threads
are torch's. AVX-512 code is picked at run time, so one build runs on any CPU of its architecture:
the container image builds it once (Dockerfile) and needs no compiler at run time.

Without the library and a C++ compiler to build it (or with LORAFLEET_NATIVE=0) the engine keeps
its pure-torch attention and elementwise ops, and says so once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch.utils import cpp_extension

from .model_source import default_cache_dir

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = sorted(CSRC.glob("*.cpp"))
HEADERS = sorted(CSRC.glob("*.h"))
_lock = threading.Lock()
_loaded: bool | None = None


def library_dir() -> Path:
    return Path(os.environ.get("LORAFLEET_NATIVE_DIR") or default_cache_dir() / "native")


def _command(compiler: str, output: Path) -> list[str]:
    torch_lib = cpp_extension.library_paths()[0]
    abi = int(torch.compiled_with_cxx11_abi())
    includes = [f"-I{p}" for p in [CSRC, *cpp_extension.include_paths()]]
    return [
        compiler, "-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *includes, *map(str, SOURCES), "-o", str(output),
        f"-L{torch_lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}",
    ]  # fmt: skip


def build(cache_dir: Path) -> Path:
    """The shared library, compiled into `cache_dir` unless a build of the same source against the
    same torch is already there."""
    flags = " ".join(_command("c++", Path("x")))
    texts = [p.read_text() for p in [*SOURCES, *HEADERS]]
    key = hashlib.sha256("\0".join([*texts, torch.__version__, flags]).encode()).hexdigest()[:16]
    target = cache_dir / f"lorafleet_ops-{key}.so"
    if target.is_file():
        return target
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError(f"no C++ compiler to build {target} (set CXX or install g++)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("compiling %s (once per machine)", ", ".join(p.name for p in SOURCES))
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        done = subprocess.run(_command(compiler, Path(tmp)), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed:\n{done.stderr[-4000:]}")
        os.replace(tmp, target)  # atomic: a concurrent build of the same key writes the same bytes
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def available() -> bool:
    """Whether the ops are loaded: built (or found) and loaded once per process, unless
    LORAFLEET_NATIVE=0 (read at every call, so a test or a bench can compare both paths)."""
    global _loaded
    if os.environ.get("LORAFLEET_NATIVE", "1") == "0":
        return False
    with _lock:
        if _loaded is None:
            _loaded = False
            try:
                torch.ops.load_library(str(build(library_dir())))
                _loaded = True
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                log.warning("no C++ ops: attention and elementwise ops run in plain torch (slower): %s", e)
        return _loaded


# The op's limits (decode_attention.cpp: kMaxHeads, kMaxHeadDim): a model past them keeps torch.
MAX_HEADS, MAX_HEAD_DIM = 128, 256


def supports(dtype: torch.dtype, device: torch.device, num_heads: int, head_dim: int) -> bool:
    """Whether decode attention runs in C++ for a model of this dtype, device and head layout."""
    return (
        device.type == "cpu"
        and dtype == torch.float32
        and num_heads <= MAX_HEADS
        and head_dim <= MAX_HEAD_DIM
        and available()
    )


def fused_ops(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the fused elementwise ops (csrc/elementwise.cpp) run: float32 on an AVX-512 CPU."""
    return (
        device.type == "cpu"
        and dtype == torch.float32
        and available()
        and bool(torch.ops.lorafleet.fused_ops_supported())
    )


def small_step_kernel(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the linear layers of steps of a few tokens can run csrc/gemv.cpp (cpu_linear):
    float32 on an AVX-512 CPU, like the fused ops."""
    return fused_ops(dtype, device)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: torch.Tensor,
    ctx_lens: torch.Tensor,
    tables: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> None:
    """out[rows[i]] = attention of q[rows[i]] over the first ctx_lens[i] tokens of the blocks in
    tables[i], for every query head (see csrc/decode_attention.cpp)."""
    torch.ops.lorafleet.decode_attention(q, k_cache, v_cache, rows, ctx_lens, tables, scale, out)
