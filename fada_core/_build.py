"""Build and load the compiled ``torch.ops.fada_core`` kernels; nothing happens at import.

Where the kernels come from, first match wins:

1. nowhere, with ``FADA_CORE_DISABLE_KERNELS=1`` (the eager backend only);
2. the ahead-of-time build ``fada_core._C``, made by
   ``FADA_CORE_BUILD_EXT=1 pip install --no-build-isolation .`` (setup.py takes :func:`extension`);
3. a just-in-time build (:func:`torch.utils.cpp_extension.load`, needs ninja) cached in
   ``TORCH_EXTENSIONS_DIR``; it announces itself on stderr when it compiles.

Both compile the same sources with the same flags: the CPU kernels once per instruction set, one
picked when the library loads (:func:`cpu_capability`), and the CUDA sources when a GPU is visible or
``FADA_CORE_FORCE_CUDA=1`` and nvcc is found. A failed build is remembered in ``_state``: the
``"auto"`` backend then warns once and runs eager, ``backend="kernel"`` raises with the reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import glob
import importlib
import importlib.util
import logging
import os
import platform
import sys
import threading
import time
import warnings
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"  # A100, H100, and PTX that later GPUs compile at load time


@dataclasses.dataclass
class _State:
    """What this process knows about the kernels; ``lock`` keeps two threads from building at once."""

    lock: threading.RLock = dataclasses.field(default_factory=threading.RLock)
    library: Optional[str] = None  # the loaded shared object (None: not loaded)
    origin: Optional[str] = None  # "aot" or "jit"
    failure: Optional[str] = None  # why loading failed; later calls raise it again without rebuilding
    no_cuda_reason: Optional[str] = None  # why the loaded library would have no CUDA kernels
    warned: bool = False  # the one fallback warning of kernels_available
    available: Dict[Tuple[str, Optional[str]], bool] = dataclasses.field(default_factory=dict)


_state = _State()


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def disabled() -> bool:
    """True when ``FADA_CORE_DISABLE_KERNELS=1`` asks for the eager backend only."""
    return _flag("FADA_CORE_DISABLE_KERNELS")


# ----------------------------------------------------------------------------- what to compile, and how


def _cpp_extension() -> Any:
    """``torch.utils.cpp_extension``, imported without its "No CUDA runtime is found" log line
    (it names torch's guess of CUDA_HOME, not the toolkit :func:`cuda_home` picks)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return importlib.import_module("torch.utils.cpp_extension")
    finally:
        logger.setLevel(level)


def cuda_home() -> Optional[str]:
    """The first of ``CUDA_HOME``, ``CUDA_PATH``, torch's guess and ``/usr/local/cuda`` that has nvcc
    and ``cuda_runtime.h`` (torch's guess alone is wrong when the ``nvcc`` on the PATH is a wrapper)."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), _cpp_extension().CUDA_HOME,
                 "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")) \
                and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def cuda_decision(force: bool = False) -> Tuple[bool, Optional[str]]:
    """``(include_cuda, reason_if_not)`` for a build on this machine."""
    if torch.version.cuda is None:
        return False, "this torch build has no CUDA support"
    if not (force or torch.cuda.is_available() or _flag("FADA_CORE_FORCE_CUDA")):
        return False, "no CUDA device visible (set FADA_CORE_FORCE_CUDA=1 to compile the CUDA sources anyway)"
    if cuda_home() is None:
        return False, "CUDA toolkit (nvcc) not found; set CUDA_HOME"
    return True, None


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
    """
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math"]
    if not with_cuda:
        return {"cxx": cxx}
    # ATen's CUDA headers need cuBLAS, cuSPARSE, ... headers that a minimal toolkit lacks and torch's
    # nvidia-* wheels have: searched after the toolkit's own include directory.
    home = cuda_home()
    wheels = [] if home is None or os.path.isfile(os.path.join(home, "include", "cublas_v2.h")) else sorted(
        {inc for site in sys.path for inc in glob.glob(os.path.join(site, "nvidia", "*", "include"))
         if os.path.isfile(os.path.join(inc, "cublas_v2.h"))})
    isystem = [flag for inc in wheels for flag in ("-isystem", inc)]
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"] + (["-Xptxas", "-v"] if ptxas_verbose else [])
    return {"cxx": cxx + isystem, "nvcc": nvcc + isystem}


def use_cuda_toolkit() -> None:
    """Make torch compile with :func:`cuda_home`; with no GPU visible to detect the architecture from,
    ``TORCH_CUDA_ARCH_LIST`` defaults to :data:`DEFAULT_CUDA_ARCH_LIST` (torch would fail)."""
    _cpp_extension().CUDA_HOME = os.environ["CUDA_HOME"] = cuda_home()
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST


def extension(with_cuda: bool) -> Any:
    """The ``fada_core._C`` extension for setup.py (which calls :func:`use_cuda_toolkit` first)."""
    cpp_extension = _cpp_extension()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return (cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension)(
        name="fada_core._C", sources=[os.path.relpath(s, root) for s in sources(with_cuda)],
        include_dirs=[CSRC], extra_compile_args=compile_args(with_cuda), extra_link_args=["-fopenmp"])


# ----------------------------------------------------------------------------- the JIT build


def build_directory(with_cuda: bool) -> str:
    """The JIT build's cache; its last component is also the library's name."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        _cpp_extension().get_default_build_root(),
        f"py{sys.version_info.major}{sys.version_info.minor}_cu{(torch.version.cuda or 'cpu').replace('.', '')}")
    return os.path.join(root, "fada_core_cuda" if with_cuda else "fada_core_cpu")


def _needs_compile(with_cuda: bool) -> bool:
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
    if not _cpp_extension().is_ninja_available():
        os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    if not _cpp_extension().is_ninja_available():
        raise RuntimeError("building the kernels just in time needs ninja: pip install ninja")


def _jit_build(with_cuda: bool, verbose: bool, ptxas_verbose: bool) -> str:
    """Compile when stale and load the JIT library; returns its path. A compile stalls the first call
    for minutes, so it says on stderr what, why and for how long."""
    ensure_ninja()
    directory, compiling, start = build_directory(with_cuda), _needs_compile(with_cuda), time.monotonic()
    if compiling:
        what = "CPU kernels (default, AVX2, AVX-512 builds)" if platform.machine() in ("x86_64", "AMD64") \
            else "CPU kernels"
        print(f"fada_core: compiling its {what}{' and CUDA kernels' if with_cuda else ''} for torch "
              f"{torch.__version__}: no up-to-date build is cached in {directory}. This happens once and "
              f"takes about 1-3 minutes on two cores{', several more for CUDA' if with_cuda else ''}; later "
              "runs load the build in a second.", file=sys.stderr, flush=True)
    os.makedirs(directory, exist_ok=True)
    if with_cuda:
        use_cuda_toolkit()
    flags = compile_args(with_cuda, ptxas_verbose)
    path = _cpp_extension().load(
        name=os.path.basename(directory), sources=sources(with_cuda), extra_include_paths=[CSRC],
        extra_cflags=flags["cxx"], extra_cuda_cflags=flags.get("nvcc"), extra_ldflags=["-fopenmp"],
        build_directory=directory, with_cuda=with_cuda, is_python_module=False, verbose=verbose)
    if compiling:
        print(f"fada_core: kernels compiled in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    return str(path)


# ----------------------------------------------------------------------------- loading


def aot_extension() -> Optional[str]:
    """The path of the installed ahead-of-time build ``fada_core._C``, or None."""
    with contextlib.suppress(ImportError, ValueError):
        return getattr(importlib.util.find_spec("fada_core._C"), "origin", None)
    return None


def _load_aot() -> Optional[str]:
    """Import ``fada_core._C`` if installed and loadable; its path, or None (then JIT)."""
    path = aot_extension()
    if path is None:
        return None
    try:
        importlib.import_module("fada_core._C")
    except (ImportError, OSError) as exc:  # e.g. built against another torch
        warnings.warn(f"fada_core: the installed fada_core._C ({path}) does not load ({exc}); "
                      "building the kernels just in time instead", RuntimeWarning, stacklevel=4)
        return None
    return path


def load(verbose: bool = False, *, force_cuda: bool = False, ptxas_verbose: bool = False,
         build: bool = True) -> None:
    """Load the compiled kernels (building them first if needed) and register their fake and autograd
    kernels. Idempotent.

    Args:
        verbose: show the compiler's output.
        force_cuda: compile the CUDA sources even with no GPU visible (as ``FADA_CORE_FORCE_CUDA=1``);
            fails if no CUDA toolkit is found.
        ptxas_verbose: pass ``-Xptxas -v`` to nvcc (register/spill report).
        build: with False, load only what is already built: raise instead of compiling.

    Raises:
        RuntimeError: with the reason, when kernels are disabled or the build or load fails. A failure
            is remembered: later calls raise it again without rebuilding.
    """
    with _state.lock:
        if _state.library is not None:
            return
        if disabled():
            raise RuntimeError("fada_core kernels are disabled by FADA_CORE_DISABLE_KERNELS=1")
        if _state.failure is not None:
            raise RuntimeError(_state.failure)
        library = _load_aot()
        with_cuda, no_cuda_reason = cuda_decision(force=force_cuda)
        if library is None and not build and _needs_compile(with_cuda):
            raise RuntimeError(f"not built yet (no up-to-date JIT build in {build_directory(with_cuda)}; "
                               "python -m fada_core.info --build builds it)")
        try:
            if library is None and force_cuda and not with_cuda:
                raise RuntimeError(f"cannot build the CUDA kernels: {no_cuda_reason}")
            origin = "jit" if library is None else "aot"
            library = library or _jit_build(with_cuda, verbose, ptxas_verbose)
            from fada_core import ops

            ops.register()
        except Exception as exc:  # noqa: BLE001 - any build/load error becomes the reason
            _state.failure = _describe_failure(exc)
            raise RuntimeError(_state.failure) from exc
        _state.library, _state.origin, _state.available = library, origin, {}
        _state.no_cuda_reason = "the installed fada_core._C was built without CUDA" if origin == "aot" \
            else no_cuda_reason
        capability = cpu_capability()
        if "ignored" in capability["reason"]:  # FADA_CORE_CPU_CAPABILITY named no build this CPU runs
            warnings.warn(f"fada_core: CPU kernels for {capability['in_use']}: {capability['reason']}",
                          RuntimeWarning, stacklevel=2)


def _describe_failure(exc: BaseException) -> str:
    """A short reason: the error's first line and the compiler's error lines, not the whole log."""
    lines = [line.rstrip() for line in (str(exc).strip() or type(exc).__name__).splitlines() if line.strip()]
    head = lines[0].split(": ", 1)[0] if lines[0].startswith("Error building extension") else lines[0]
    keys = ("error", "not found", "No such file", "undefined", "FAILED")
    picked = [line[:400] for line in lines[1:] if any(k in line for k in keys) and not line.startswith("[")][:12]
    hint = "\n(full compiler output: python -m fada_core.info --build --verbose)" if len(lines) > 1 else ""
    return (f"building/loading the fada_core extension failed ({type(exc).__name__}): "
            + "\n".join([head] + picked) + hint)


# ----------------------------------------------------------------------------- what is loaded


def op_devices() -> Dict[str, List[str]]:
    """``{operator: devices it has kernels for}`` of the loaded library (empty before loading);
    ``["any"]`` for the operators without tensors (the limits, the label-error check)."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fada_core::"))
    return {n: ["any"] if has(n, "CompositeImplicitAutograd") else [d.lower() for d in ("CPU", "CUDA") if has(n, d)]
            for n in names}


def kernels_available(device: Any = "cpu", op: Optional[str] = None) -> bool:
    """Whether compiled kernels can run on ``device`` (a device, string or tensor); with ``op`` (e.g.
    ``"class_center_stats"``) only that operator is checked.

    The first call loads the extension (building it if needed). On failure it warns once with the reason
    and returns False; it never raises.
    """
    try:
        device_type = (device.device if isinstance(device, torch.Tensor) else torch.device(device)).type
    except (RuntimeError, TypeError, ValueError):
        return False
    if (device_type, op) in _state.available:  # called by every op with backend="auto": kept cheap
        return _state.available[(device_type, op)]
    if disabled():
        return False
    with _state.lock:
        try:
            load()
        except Exception as exc:  # noqa: BLE001 - a capability query never raises
            if not _state.warned:
                _state.warned = True
                warnings.warn(f"fada_core: compiled kernels unavailable, using the eager backend. {exc}",
                              RuntimeWarning, stacklevel=2)
            return False
        ops = op_devices()
        names = [op if "::" in op else f"fada_core::{op}"] if op else list(ops)
        available = bool(names) and all(set(ops.get(n, ())) & {device_type, "any"} for n in names)
        _state.available[(device_type, op)] = available
        return available


def is_loaded() -> bool:
    return _state.library is not None


def failure_reason() -> Optional[str]:
    """Why the kernels are not loaded (None when loaded or not tried yet)."""
    if disabled() and not is_loaded():
        return "disabled by FADA_CORE_DISABLE_KERNELS=1"
    return _state.failure


def status() -> Dict[str, Any]:
    """Whether and which kernels are loaded, or why not; loads nothing. (``fada_core.info.status``
    adds the versions and the toolchain.)"""
    ops = op_devices() if is_loaded() else {}
    cuda_kernels = any("cuda" in devices for devices in ops.values())
    would_build_cuda, no_cuda_reason = cuda_decision()
    return {
        "disabled": disabled(), "aot_extension": aot_extension(), "loaded": is_loaded(), "origin": _state.origin, "library": _state.library,
        "failure": failure_reason(), "cpu_capability": cpu_capability() if is_loaded() else None, "ops": ops,
        "cuda_kernels": cuda_kernels,
        "cuda_kernels_reason": None if cuda_kernels else _state.no_cuda_reason if is_loaded() else no_cuda_reason,
        "would_build_cuda": would_build_cuda,
        "build_dir": os.path.dirname(_state.library) if is_loaded() else build_directory(would_build_cuda),
    }


# ----------------------------------------------------------------------------- the CPU instruction sets


@functools.lru_cache(maxsize=None)
def _symbols(path: str) -> ctypes.CDLL:
    """The loaded library's C functions (csrc/cpu/dispatch.cpp)."""
    lib = ctypes.CDLL(path)
    for name in ("fada_core_cpu_capability", "fada_core_cpu_capability_reason", "fada_core_cpu_capabilities"):
        getattr(lib, name).restype = ctypes.c_char_p
    return lib


def cpu_capability() -> Dict[str, Any]:
    """Which instruction-set build of the CPU kernels runs: ``{"in_use", "reason", "supported"}``
    (``supported``: the builds this CPU runs, narrowest first). ``FADA_CORE_CPU_CAPABILITY=default|avx2|
    avx512`` picks one when the library loads; by default the widest. Needs the kernels loaded."""
    if not is_loaded():
        raise RuntimeError("fada_core kernels are not loaded")
    lib = _symbols(_state.library)
    return {"in_use": lib.fada_core_cpu_capability().decode(),
            "reason": lib.fada_core_cpu_capability_reason().decode(),
            "supported": lib.fada_core_cpu_capabilities().decode().split(",")}


def set_cpu_capability(name: str) -> None:
    """Run the CPU kernels of build ``name`` from now on (tests and benchmarks hold every build to the
    reference); ValueError when this CPU does not run it."""
    supported = cpu_capability()["supported"]
    if name not in supported or _symbols(_state.library).fada_core_set_cpu_capability(name.encode()) != 0:
        raise ValueError(f"cpu capability must be one of {supported} on this CPU, got {name!r}")


@contextlib.contextmanager
def use_cpu_capability(name: str) -> Iterator[None]:
    """:func:`set_cpu_capability` for the duration of a block."""
    previous = cpu_capability()["in_use"]
    set_cpu_capability(name)
    try:
        yield
    finally:
        set_cpu_capability(previous)
