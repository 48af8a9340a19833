"""Find, build and load the compiled ``torch.ops.fada_core`` kernels; nothing happens at import.

Where the kernels come from, first match wins: nowhere with ``FADA_CORE_DISABLE_KERNELS=1``; the
ahead-of-time build ``fada_core._C`` (``FADA_CORE_BUILD_EXT=1 pip install --no-build-isolation .``,
setup.py takes :func:`extension` from here); a just-in-time build (:func:`torch.utils.cpp_extension.load`,
needs ninja) cached in ``TORCH_EXTENSIONS_DIR``, which announces itself on stderr when it compiles.
Both compile the same sources with the same flags: the CPU kernels once per instruction set, one picked
when the library loads (:func:`cpu_capability`; ``FADA_CORE_CPU_CAPABILITY=default|avx2|avx512``), and
the CUDA sources when a GPU is visible or ``FADA_CORE_FORCE_CUDA=1`` and nvcc is found (with no GPU
visible ``TORCH_CUDA_ARCH_LIST`` defaults to :data:`DEFAULT_CUDA_ARCH_LIST`).
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
import subprocess
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
    lock: threading.RLock = dataclasses.field(default_factory=threading.RLock)
    loaded: bool = False
    origin: Optional[str] = None  # "aot" or "jit"
    library: Optional[str] = None  # the shared object's path
    failure: Optional[str] = None  # why loading failed; later calls raise it again without rebuilding
    cuda_reason: Optional[str] = None  # why the loaded library has no CUDA kernels
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
    """The CUDA toolkit to compile with: the first of ``CUDA_HOME``, ``CUDA_PATH``, torch's guess and
    ``/usr/local/cuda`` that has ``bin/nvcc`` and ``include/cuda_runtime.h`` (torch's guess alone is wrong
    when the ``nvcc`` on the PATH is a wrapper script)."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), _cpp_extension().CUDA_HOME,
                 "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
                os.path.join(home, "include", "cuda_runtime.h")):
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
    """The translation units: the op schemas, the CPU dispatcher, one CPU build per instruction set
    (each includes the kernel sources csrc/cpu/*_kernel.cpp), and csrc/cuda/*.cu."""
    files = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    files += [os.path.join(CSRC, "cpu", "dispatch.cpp")] + sorted(glob.glob(os.path.join(CSRC, "cpu", "isa", "*.cpp")))
    if with_cuda:
        files += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    return files


def cflags() -> List[str]:
    # No -march=native: the instruction sets are chosen per build at run time (csrc/cpu/dispatch.cpp).
    # -fno-trapping-math lets GCC vectorise the kernels' selects (clamps in exp/log) without AVX-512
    # masks; results are unchanged (it only drops the promise to keep floating-point exception flags).
    return ["-O3", "-fopenmp", "-fno-trapping-math"]


def cuda_cflags(ptxas_verbose: bool = False) -> List[str]:
    # No --use_fast_math: it changes exp/log/division rounding and NaN handling, and the kernels
    # must match the eager reference.
    return ["-O3", "-lineinfo", "--expt-relaxed-constexpr"] + (["-Xptxas", "-v"] if ptxas_verbose else [])


def _cuda_fallback_includes(home: str) -> List[str]:
    """``-isystem`` flags for the headers ATen's CUDA headers need (cuBLAS, cuSPARSE, ...) that the toolkit
    lacks but torch's ``nvidia-*`` wheels have; searched after the toolkit's own include directory."""
    if os.path.isfile(os.path.join(home, "include", "cublas_v2.h")):
        return []
    found = {inc for site in sys.path for inc in glob.glob(os.path.join(site, "nvidia", "*", "include"))
             if os.path.isfile(os.path.join(inc, "cublas_v2.h"))}
    return [flag for inc in sorted(found) for flag in ("-isystem", inc)]


@contextlib.contextmanager
def cuda_environment(with_cuda: bool) -> Iterator[None]:
    """For the duration of a build with the CUDA sources: torch compiles with :func:`cuda_home`, and
    ``TORCH_CUDA_ARCH_LIST`` has a default when no GPU is visible to detect the architecture from."""
    cpp_extension = _cpp_extension()
    saved = cpp_extension.CUDA_HOME, {k: os.environ.get(k) for k in ("CUDA_HOME", "TORCH_CUDA_ARCH_LIST")}
    if with_cuda:
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"] = cuda_home()
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    try:
        yield
    finally:
        cpp_extension.CUDA_HOME = saved[0]
        for key, value in saved[1].items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def extension(with_cuda: bool) -> Any:
    """The ``fada_core._C`` extension for setup.py (AOT), from the same sources and flags as the JIT
    build; setup.py builds it inside :func:`cuda_environment`."""
    cpp_extension = _cpp_extension()
    fallback = _cuda_fallback_includes(cuda_home()) if with_cuda else []
    compile_args = {"cxx": cflags() + fallback, "nvcc": cuda_cflags() + fallback} if with_cuda else {"cxx": cflags()}
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return (cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension)(
        name="fada_core._C",
        sources=[os.path.relpath(s, here) for s in sources(with_cuda)],
        include_dirs=[CSRC],
        extra_compile_args=compile_args,
        extra_link_args=["-fopenmp"],
    )


# ----------------------------------------------------------------------------- the JIT build


def build_name(with_cuda: bool) -> str:
    return "fada_core_cuda" if with_cuda else "fada_core_cpu"


def build_directory(with_cuda: bool) -> str:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        _cpp_extension().get_default_build_root(),
        f"py{sys.version_info.major}{sys.version_info.minor}_cu{(torch.version.cuda or 'cpu').replace('.', '')}")
    return os.path.join(root, build_name(with_cuda))


def _needs_compile(with_cuda: bool) -> bool:
    """Whether the JIT cache lacks the library or holds one older than a source or header."""
    library = os.path.join(build_directory(with_cuda), build_name(with_cuda) + ".so")
    if not os.path.isfile(library):
        return True
    newest = max(os.path.getmtime(p) for p in glob.glob(os.path.join(CSRC, "**", "*"), recursive=True))
    return newest > os.path.getmtime(library)


def _ensure_ninja() -> None:
    """Find ninja, or raise. The pip ``ninja`` package installs it next to the interpreter, which is not
    on the PATH when a venv's python is run directly: add that directory."""
    cpp_extension = _cpp_extension()
    if not cpp_extension.is_ninja_available():
        os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("building the kernels just in time needs ninja: pip install ninja")


def _jit_build(with_cuda: bool, verbose: bool, ptxas_verbose: bool) -> str:
    """Compile (when stale) and load the JIT library, announcing a compile on stderr; returns its path."""
    _ensure_ninja()
    fallback = _cuda_fallback_includes(cuda_home()) if with_cuda else []
    directory = build_directory(with_cuda)
    announce = _needs_compile(with_cuda)
    if announce:
        what = "CPU kernels (default, AVX2, AVX-512 builds)" if platform.machine() in ("x86_64", "AMD64") \
            else "CPU kernels"
        what += " and CUDA kernels" if with_cuda else ""
        print(f"fada_core: compiling its {what} for torch {torch.__version__}: no up-to-date build is cached in "
              f"{directory}. This happens once and takes about 1-3 minutes on two cores"
              f"{', several more for CUDA' if with_cuda else ''}; later runs load the build in a second.",
              file=sys.stderr, flush=True)
    start = time.monotonic()
    os.makedirs(directory, exist_ok=True)
    with cuda_environment(with_cuda):
        path = _cpp_extension().load(
            name=build_name(with_cuda), sources=sources(with_cuda), extra_include_paths=[CSRC],
            extra_cflags=cflags() + fallback,
            extra_cuda_cflags=cuda_cflags(ptxas_verbose) + fallback if with_cuda else None,
            extra_ldflags=["-fopenmp"], build_directory=directory, with_cuda=with_cuda,
            is_python_module=False, verbose=verbose)
    if announce:
        print(f"fada_core: kernels compiled in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    return str(path)


# ----------------------------------------------------------------------------- loading


def _aot_spec() -> Any:
    with contextlib.suppress(ImportError, ValueError):
        return importlib.util.find_spec("fada_core._C")
    return None


def _load_aot() -> Optional[str]:
    """Import ``fada_core._C`` if installed and loadable; its path, or None (then JIT)."""
    spec = _aot_spec()
    if spec is None or not spec.origin:
        return None
    try:
        importlib.import_module("fada_core._C")
    except (ImportError, OSError) as exc:  # e.g. built against another torch
        warnings.warn(f"fada_core: the installed fada_core._C ({spec.origin}) does not load ({exc}); "
                      "building the kernels just in time instead", RuntimeWarning, stacklevel=4)
        return None
    return spec.origin


def load(verbose: bool = False, *, force_cuda: bool = False, ptxas_verbose: bool = False, jit: bool = False,
         build: bool = True) -> None:
    """Load the compiled kernels (building them first if needed) and register their fake and autograd
    kernels. Idempotent.

    Args:
        verbose: show the compiler's output.
        force_cuda: compile the CUDA sources even with no GPU visible (as ``FADA_CORE_FORCE_CUDA=1``);
            fails if no CUDA toolkit is found.
        ptxas_verbose: pass ``-Xptxas -v`` to nvcc (register/spill report).
        jit: use the JIT build even if an ahead-of-time ``fada_core._C`` is installed.
        build: with False, load only what is already built: raise instead of compiling.

    Raises:
        RuntimeError: with the reason, when kernels are disabled or the build or load fails. A failure
            is remembered: later calls raise it again without rebuilding.
    """
    with _state.lock:
        if _state.loaded:
            return
        if disabled():
            raise RuntimeError("fada_core kernels are disabled by FADA_CORE_DISABLE_KERNELS=1")
        if _state.failure is not None:
            raise RuntimeError(_state.failure)
        library = None if jit else _load_aot()
        with_cuda, cuda_reason = cuda_decision(force=force_cuda)
        if library is None and not build and _needs_compile(with_cuda):
            raise RuntimeError(f"not built yet (no up-to-date JIT build in {build_directory(with_cuda)}; "
                               "python -m fada_core.info --build builds it)")
        try:
            if library is not None:
                _state.origin, _state.library = "aot", library
            else:
                if force_cuda and not with_cuda:
                    raise RuntimeError(f"cannot build the CUDA kernels: {cuda_reason}")
                _state.library = _jit_build(with_cuda, verbose, ptxas_verbose)
                _state.origin = "jit"
            from fada_core import ops

            ops.register()
        except Exception as exc:  # noqa: BLE001 - any build/load error becomes the reason
            _state.failure = _describe_failure(exc)
            raise RuntimeError(_state.failure) from exc
        _state.loaded = True
        _state.available.clear()
        _state.cuda_reason = None if _has_kernel("CUDA") else (
            "the installed fada_core._C was built without CUDA" if _state.origin == "aot" else cuda_reason)
        capability = cpu_capability()
        if "ignored" in capability["reason"]:
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


# ----------------------------------------------------------------------------- queries


def op_names() -> List[str]:
    """Qualified names of the operators the loaded library declares (empty before loading)."""
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fada_core::"))


def _is_composite(name: str) -> bool:
    """Operators with one kernel for every device (no tensors: the limits, the label-error check)."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeImplicitAutograd")
    except RuntimeError:
        return False


def _has_kernel(dispatch_key: str, op: Optional[str] = None) -> bool:
    names = [op if "::" in op else f"fada_core::{op}"] if op else [n for n in op_names() if not _is_composite(n)]
    try:
        return bool(names) and all(
            _is_composite(n) or torch._C._dispatch_has_kernel_for_dispatch_key(n, dispatch_key) for n in names
        )
    except RuntimeError:
        return False


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
    key = (device_type.upper(), op)
    if key in _state.available:
        return _state.available[key]
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
        _state.available[key] = _has_kernel(key[0], op)
        return _state.available[key]


def is_loaded() -> bool:
    return _state.loaded


def failure_reason() -> Optional[str]:
    """Why the kernels are not loaded (None when loaded or not tried yet)."""
    if disabled() and not _state.loaded:
        return "disabled by FADA_CORE_DISABLE_KERNELS=1"
    return _state.failure


@functools.lru_cache(maxsize=None)
def _symbols(path: str) -> ctypes.CDLL:
    """The loaded library's C functions (csrc/cpu/dispatch.cpp)."""
    lib = ctypes.CDLL(path)
    for name in ("fada_core_cpu_capability", "fada_core_cpu_capability_reason", "fada_core_cpu_capabilities"):
        getattr(lib, name).restype = ctypes.c_char_p
    return lib


def cpu_capability() -> Dict[str, Any]:
    """Which instruction-set build of the CPU kernels runs: ``{"in_use", "reason", "supported"}``
    (``supported``: the builds this CPU runs, narrowest first). Needs the kernels loaded."""
    if not _state.loaded:
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


def _version_line(cmd: List[str], containing: str = "") -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return next((line.strip() for line in out.splitlines() if line.strip() and containing in line), None)


def status() -> Dict[str, Any]:
    """What a user has: versions, toolchain, and whether and which kernels are loaded. Loads nothing."""
    home = cuda_home()
    would_build_cuda, cuda_reason = cuda_decision()
    ops: Dict[str, List[str]] = {}
    for name in op_names() if _state.loaded else ():
        # operators without tensors (limits, the label-error check) run on any device
        composite = _is_composite(name)
        ops[name] = ["any (device-independent)"] if composite else [k.lower() for k in ("CPU", "CUDA") if _has_kernel(k, name)]
    cuda_kernels = any("cuda" in devices for devices in ops.values())
    spec = _aot_spec()
    with contextlib.suppress(RuntimeError):
        _ensure_ninja()
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cuda_home": home,
        "nvcc": _version_line([os.path.join(home, "bin", "nvcc"), "--version"], "release") if home else None,
        "cxx": _version_line([os.environ.get("CXX", "c++"), "--version"]),
        "ninja": _cpp_extension().is_ninja_available(),
        "torch_cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST")
        or (None if torch.cuda.is_available() else f"{DEFAULT_CUDA_ARCH_LIST} (default)"),
        "disabled": disabled(),
        "aot_extension": spec.origin if spec is not None else None,
        "loaded": _state.loaded,
        "origin": _state.origin,
        "library": _state.library,
        "failure": failure_reason(),
        "cpu_capability": cpu_capability() if _state.loaded else None,
        "cuda_kernels": cuda_kernels,
        "cuda_kernels_reason": None if cuda_kernels else (_state.cuda_reason or "not built") if _state.loaded
        else cuda_reason,
        "would_build_cuda": would_build_cuda,
        "build_dir": os.path.dirname(_state.library) if _state.library else build_directory(would_build_cuda),
        "ops": ops,
    }
