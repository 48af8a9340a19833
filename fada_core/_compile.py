"""What the compiled ``torch.ops.fada_core`` kernels are built from, and how: the sources, the
compiler flags, the CUDA toolkit, the ahead-of-time extension and the just-in-time build.

Both builds compile the same sources with the same flags: the CPU kernels once per instruction set
(one is picked when the library loads, see :mod:`fada_core._build`), and the CUDA sources when a GPU
is visible or ``FADA_CORE_FORCE_CUDA=1`` and nvcc is found. setup.py loads this file on its own,
without importing the package: it imports nothing from fada_core.
"""

from __future__ import annotations

import glob
import importlib
import logging
import os
import platform
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"  # A100, H100, and PTX that later GPUs compile at load time


def env_flag(name: str) -> bool:
    """Whether the environment variable ``name`` is set to a true value (1, true, yes, on)."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def cpp_extension() -> Any:
    """``torch.utils.cpp_extension``, imported without its "No CUDA runtime is found" log line
    (it names torch's guess of CUDA_HOME, not the toolkit :func:`cuda_home` picks)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return importlib.import_module("torch.utils.cpp_extension")
    finally:
        logger.setLevel(level)


# ----------------------------------------------------------------------------- the CUDA toolkit


def cuda_home() -> Optional[str]:
    """The first of ``CUDA_HOME``, ``CUDA_PATH``, torch's guess and ``/usr/local/cuda`` that has nvcc
    and ``cuda_runtime.h`` (torch's guess alone is wrong when the ``nvcc`` on the PATH is a wrapper)."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension().CUDA_HOME,
                 "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")) \
                and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def cuda_decision(force: bool = False) -> Tuple[bool, Optional[str]]:
    """``(include_cuda, reason_if_not)`` for a build on this machine."""
    if torch.version.cuda is None:
        return False, "this torch build has no CUDA support"
    if not (force or torch.cuda.is_available() or env_flag("FADA_CORE_FORCE_CUDA")):
        return False, "no CUDA device visible (set FADA_CORE_FORCE_CUDA=1 to compile the CUDA sources anyway)"
    if cuda_home() is None:
        return False, "CUDA toolkit (nvcc) not found; set CUDA_HOME"
    return True, None


def use_cuda_toolkit() -> None:
    """Make torch compile with :func:`cuda_home`; with no GPU visible to detect the architecture from,
    ``TORCH_CUDA_ARCH_LIST`` defaults to :data:`DEFAULT_CUDA_ARCH_LIST` (torch would fail)."""
    cpp_extension().CUDA_HOME = os.environ["CUDA_HOME"] = cuda_home()
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST


# ----------------------------------------------------------------------------- what to compile, and how


def sources(with_cuda: bool) -> List[str]:
    """The op schemas, the CPU dispatcher, one CPU build per instruction set (each includes the
    kernel sources csrc/cpu/*_kernel.cpp), and csrc/cuda/*.cu."""
    files = sorted(glob.glob(os.path.join(CSRC, "*.cpp"))) + [os.path.join(CSRC, "cpu", "dispatch.cpp")]
    files += sorted(glob.glob(os.path.join(CSRC, "cpu", "isa", "*.cpp")))
    return files + (sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu"))) if with_cuda else [])


def compile_args(with_cuda: bool, ptxas_verbose: bool = False) -> Dict[str, List[str]]:
    """The compiler flags: ``{"cxx": [...]}``, and ``"nvcc"`` with the CUDA sources.

    No ``-march=native``: the instruction sets are chosen per build at run time (csrc/cpu/dispatch.cpp).
    ``-fno-trapping-math`` lets GCC vectorise the kernels' selects (clamps in exp/log) without AVX-512
    masks; results are unchanged (it only drops the promise to keep floating-point exception flags).
    No ``--use_fast_math``: it changes exp/log/division rounding and NaN handling, and the kernels must
    match the eager reference. ``ptxas_verbose`` adds nvcc's register/spill report.
    ``-DNDEBUG -fno-wrapv``: the AOT build (setup.py) compiles with Python's own flags first, which
    include ``-DNDEBUG -fwrapv``; with these two the JIT and AOT builds are the same machine code
    (``benchmarks/compare_builds.py``). ``-fwrapv`` would forbid the loop optimisations that rely on
    signed overflow being undefined.
    """
    cxx = ["-O3", "-DNDEBUG", "-fno-wrapv", "-fopenmp", "-fno-trapping-math"]
    if not with_cuda:
        return {"cxx": cxx}
    isystem = [flag for inc in _wheel_cuda_includes() for flag in ("-isystem", inc)]
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"] + (["-Xptxas", "-v"] if ptxas_verbose else [])
    return {"cxx": cxx + isystem, "nvcc": nvcc + isystem}


def _wheel_cuda_includes() -> List[str]:
    """ATen's CUDA headers need cuBLAS, cuSPARSE, ... headers that a minimal toolkit lacks and torch's
    nvidia-* wheels have: their include directories, searched after the toolkit's own."""
    home = cuda_home()
    if home is None or os.path.isfile(os.path.join(home, "include", "cublas_v2.h")):
        return []
    return sorted({inc for site in sys.path for inc in glob.glob(os.path.join(site, "nvidia", "*", "include"))
                   if os.path.isfile(os.path.join(inc, "cublas_v2.h"))})


def extension(with_cuda: bool) -> Any:
    """The ``fada_core._C`` extension for setup.py (which calls :func:`use_cuda_toolkit` first)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return (cpp_extension().CUDAExtension if with_cuda else cpp_extension().CppExtension)(
        name="fada_core._C", sources=[os.path.relpath(s, root) for s in sources(with_cuda)],
        include_dirs=[CSRC], extra_compile_args=compile_args(with_cuda), extra_link_args=["-fopenmp"])


# ----------------------------------------------------------------------------- the JIT build


def build_directory(with_cuda: bool) -> str:
    """The JIT build's cache; its last component is also the library's name."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        cpp_extension().get_default_build_root(),
        f"py{sys.version_info.major}{sys.version_info.minor}_cu{(torch.version.cuda or 'cpu').replace('.', '')}")
    return os.path.join(root, "fada_core_cuda" if with_cuda else "fada_core_cpu")


def needs_compile(with_cuda: bool) -> bool:
    """Whether the JIT cache lacks the library or holds one older than a source or header."""
    directory = build_directory(with_cuda)
    library = os.path.join(directory, os.path.basename(directory) + ".so")
    if not os.path.isfile(library):
        return True
    newest = max(os.path.getmtime(p) for p in glob.glob(os.path.join(CSRC, "**", "*"), recursive=True))
    return newest > os.path.getmtime(library)


def ensure_ninja() -> None:
    """Find ninja, or raise. The pip ``ninja`` package installs it next to the interpreter, which is not
    on the PATH when a venv's python is run directly: add that directory."""
    if not cpp_extension().is_ninja_available():
        os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    if not cpp_extension().is_ninja_available():
        raise RuntimeError("building the kernels just in time needs ninja: pip install ninja")


def jit_build(with_cuda: bool, verbose: bool, ptxas_verbose: bool) -> str:
    """Compile when stale and load the JIT library; returns its path. A compile stalls the first call
    for minutes, so it says on stderr what, why and for how long, before it starts."""
    ensure_ninja()
    directory, compiling, start = build_directory(with_cuda), needs_compile(with_cuda), time.monotonic()
    if compiling:
        _announce_compile(with_cuda, directory)
    os.makedirs(directory, exist_ok=True)
    if with_cuda:
        use_cuda_toolkit()
    flags = compile_args(with_cuda, ptxas_verbose)
    path = cpp_extension().load(
        name=os.path.basename(directory), sources=sources(with_cuda), extra_include_paths=[CSRC],
        extra_cflags=flags["cxx"], extra_cuda_cflags=flags.get("nvcc"), extra_ldflags=["-fopenmp"],
        build_directory=directory, with_cuda=with_cuda, is_python_module=False, verbose=verbose)
    if compiling:
        print(f"fada_core: kernels compiled in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    return str(path)


def _announce_compile(with_cuda: bool, directory: str) -> None:
    what = "CPU kernels (default, AVX2, AVX-512 builds)" if platform.machine() in ("x86_64", "AMD64") \
        else "CPU kernels"
    print(f"fada_core: compiling its {what}{' and CUDA kernels' if with_cuda else ''} for torch "
          f"{torch.__version__}: no up-to-date build is cached in {directory}. This happens once and "
          f"takes about 1-3 minutes on two cores{', several more for CUDA' if with_cuda else ''}; later "
          "runs load the build in a second.", file=sys.stderr, flush=True)
