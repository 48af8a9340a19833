"""Find, build and load the compiled ``torch.ops.fada_core`` kernels.

Order of preference:

1. ``FADA_CORE_DISABLE_KERNELS=1``: no kernels at all (eager backend only).
2. An ahead-of-time build ``fada_core._C`` (``FADA_CORE_BUILD_EXT=1 pip install
   --no-build-isolation .``), imported as a Python extension.
3. A just-in-time build with :func:`torch.utils.cpp_extension.load`, cached in
   ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``). The CUDA
   sources are included when ``torch.cuda.is_available()`` (or
   ``FADA_CORE_FORCE_CUDA=1``) and a CUDA toolkit is found; CPU-only and CUDA
   builds use different names so they never overwrite each other.

Nothing is built or loaded at ``import fada_core``: the first call to
:func:`load` or :func:`kernels_available` does it. Other environment variables:
``FADA_CORE_NO_NATIVE=1`` drops ``-march=native`` from JIT builds (for caches
shared between machines); ``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures
(default ``"8.0;9.0+PTX"`` when no GPU is visible).
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import threading
import warnings
from typing import Any, Dict, Iterator, List, Optional

import torch

_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
_NAMESPACE = "fada_core"
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"  # +PTX: newer GPUs JIT the sm_90 PTX

_lock = threading.RLock()
_loaded = False
_origin: Optional[str] = None  # "aot" or "jit"
_library_path: Optional[str] = None
_failure: Optional[str] = None
_attempted = False
_warned = False
_cuda_reason: Optional[str] = None  # why the CUDA sources were left out of the build
_build_dir: Optional[str] = None  # where the last JIT build went
_availability: Dict[tuple, bool] = {}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def disabled() -> bool:
    """True when ``FADA_CORE_DISABLE_KERNELS=1`` asks for the eager backend only."""
    return _env_flag("FADA_CORE_DISABLE_KERNELS")


# ----------------------------------------------------------------------------- toolchain


def _cpp_extension() -> Any:
    """``torch.utils.cpp_extension``, imported without its "No CUDA runtime is found"
    warning (which names torch's CUDA_HOME guess, not the toolkit :func:`cuda_home` picks)."""
    if "torch.utils.cpp_extension" not in sys.modules:
        logger = logging.getLogger("torch.utils.cpp_extension")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            importlib.import_module("torch.utils.cpp_extension")
        finally:
            logger.setLevel(level)
    return sys.modules["torch.utils.cpp_extension"]


def cuda_home() -> Optional[str]:
    """The CUDA toolkit to compile with: one that has ``bin/nvcc`` and ``include/cuda_runtime.h``.

    torch guesses ``dirname(dirname(which nvcc))``, which is wrong when ``nvcc`` on
    the PATH is a wrapper script (e.g. ``/usr/local/bin/nvcc``); this also tries
    ``CUDA_HOME``/``CUDA_PATH`` and ``/usr/local/cuda``.
    """
    cpp_extension = _cpp_extension()

    candidates = [
        os.environ.get("CUDA_HOME"),
        os.environ.get("CUDA_PATH"),
        cpp_extension.CUDA_HOME,
        "/usr/local/cuda",
    ]
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
            os.path.join(home, "include", "cuda_runtime.h")
        ):
            return home
    return None


def _first_line(cmd: List[str]) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line for line in out.strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else None


def _nvcc_version(home: str) -> Optional[str]:
    try:
        out = subprocess.run(
            [os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in out.splitlines() if "release" in line]
    return lines[0] if lines else None


def _cxx() -> str:
    return os.environ.get("CXX", "c++")


def _ensure_ninja_on_path() -> bool:
    """Make ``ninja`` findable: the pip ``ninja`` package installs it next to the
    interpreter, which is not on the PATH when a venv's python is run directly."""
    cpp_extension = _cpp_extension()

    if cpp_extension.is_ninja_available():
        return True
    extra = [os.path.dirname(sys.executable)]
    with contextlib.suppress(Exception):
        import ninja  # type: ignore[import-not-found]

        extra.insert(0, ninja.BIN_DIR)
    for directory in extra:
        if os.path.isfile(os.path.join(directory, "ninja")):
            os.environ["PATH"] = directory + os.pathsep + os.environ.get("PATH", "")
            return cpp_extension.is_ninja_available()
    return False


def _cuda_extra_include_paths(home: str) -> List[str]:
    """Headers ATen's CUDA headers need (cuBLAS, cuSPARSE, cuSOLVER) when the toolkit
    lacks them but the pip ``nvidia-*`` wheels that torch depends on have them."""
    if os.path.isfile(os.path.join(home, "include", "cublas_v2.h")):
        return []
    paths: List[str] = []
    for site in sys.path:
        for inc in sorted(glob.glob(os.path.join(site, "nvidia", "*", "include"))):
            if os.path.isfile(os.path.join(inc, "cublas_v2.h")) and inc not in paths:
                paths.append(inc)
    return paths


# ----------------------------------------------------------------------------- sources and flags


def sources(with_cuda: bool) -> List[str]:
    """The C++ (and optionally CUDA) source files of the extension, in a fixed order."""
    files = [os.path.join(_CSRC, "fada_core.cpp")]
    files += sorted(glob.glob(os.path.join(_CSRC, "cpu", "*.cpp")))
    if with_cuda:
        files += sorted(glob.glob(os.path.join(_CSRC, "cuda", "*.cu")))
    return files


def cuda_decision(force: bool = False) -> tuple:
    """``(include_cuda, reason_if_not)`` for a build on this machine."""
    if torch.version.cuda is None:
        return False, "this torch build has no CUDA support"
    if not (force or torch.cuda.is_available() or _env_flag("FADA_CORE_FORCE_CUDA")):
        return False, "no CUDA device visible (set FADA_CORE_FORCE_CUDA=1 to compile the CUDA sources anyway)"
    if cuda_home() is None:
        return False, "CUDA toolkit (nvcc) not found; set CUDA_HOME"
    return True, None


def cflags(native: bool) -> List[str]:
    flags = ["-O3", "-fopenmp"]
    if native and not _env_flag("FADA_CORE_NO_NATIVE"):
        flags.append("-march=native")
    return flags


def cuda_cflags(ptxas_verbose: bool = False) -> List[str]:
    # No --use_fast_math: it flushes denormals and changes exp/log/division
    # rounding and NaN handling, and the kernels must match the eager reference.
    flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    if ptxas_verbose:
        flags += ["-Xptxas", "-v"]
    return flags


@contextlib.contextmanager
def _cuda_build_env(home: Optional[str]) -> Iterator[None]:
    """Point torch's cpp_extension at ``home`` and default ``TORCH_CUDA_ARCH_LIST``
    for the duration of a build."""
    cpp_extension = _cpp_extension()

    saved_home = cpp_extension.CUDA_HOME
    saved_env = {k: os.environ.get(k) for k in ("TORCH_CUDA_ARCH_LIST", "CUDA_HOME")}
    try:
        if home is not None:
            cpp_extension.CUDA_HOME = home
            os.environ["CUDA_HOME"] = home
            if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
                os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
        yield
    finally:
        cpp_extension.CUDA_HOME = saved_home
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def build_name(with_cuda: bool) -> str:
    return "fada_core_cuda" if with_cuda else "fada_core_cpu"


def build_directory(with_cuda: bool) -> str:
    cpp_extension = _cpp_extension()

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        cpp_extension.get_default_build_root(),
        f"py{sys.version_info.major}{sys.version_info.minor}_cu{(torch.version.cuda or 'cpu').replace('.', '')}",
    )
    return os.path.join(root, build_name(with_cuda))


def _jit_build(with_cuda: bool, verbose: bool, ptxas_verbose: bool = False) -> str:
    """Compile (if stale) and load the JIT extension; returns the shared object's path."""
    cpp_extension = _cpp_extension()

    home = cuda_home() if with_cuda else None
    # Searched after the toolkit's own include dir (-isystem, appended), so they
    # only supply the headers it lacks.
    fallback = [f for d in (_cuda_extra_include_paths(home) if home else []) for f in ("-isystem", d)]
    directory = build_directory(with_cuda)
    os.makedirs(directory, exist_ok=True)
    with _cuda_build_env(home):
        path = cpp_extension.load(
            name=build_name(with_cuda),
            sources=sources(with_cuda),
            extra_include_paths=[_CSRC],
            extra_cflags=cflags(native=True) + fallback,
            extra_cuda_cflags=cuda_cflags(ptxas_verbose) + fallback if with_cuda else None,
            extra_ldflags=["-fopenmp"],
            build_directory=directory,
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=verbose,
        )
    return str(path)


def _setuptools_build(with_cuda: bool, verbose: bool) -> str:
    """Build without ninja: setuptools + BuildExtension in a subprocess, then load the result.

    Slower (no parallel or incremental compilation) but needs only a compiler.
    """
    directory = os.path.join(build_directory(with_cuda), "setuptools")
    os.makedirs(directory, exist_ok=True)
    home = cuda_home() if with_cuda else None
    include_paths = [_CSRC]
    fallback = [f for d in (_cuda_extra_include_paths(home) if home else []) for f in ("-isystem", d)]
    extension = "CUDAExtension" if with_cuda else "CppExtension"
    compile_args: Dict[str, List[str]] = {"cxx": cflags(native=True) + fallback}
    if with_cuda:
        compile_args["nvcc"] = cuda_cflags() + fallback
    script = (
        "import sys\n"
        "from setuptools import setup\n"
        f"from torch.utils.cpp_extension import BuildExtension, {extension}\n"
        f"setup(name='fada_core_ext', script_args=['build_ext', '--build-lib', {directory!r},"
        f" '--build-temp', {os.path.join(directory, 'tmp')!r}],\n"
        f"      ext_modules=[{extension}('{build_name(with_cuda)}', {sources(with_cuda)!r},"
        f" include_dirs={include_paths!r}, extra_compile_args={compile_args!r},"
        " extra_link_args=['-fopenmp'])],\n"
        "      cmdclass={'build_ext': BuildExtension.with_options(use_ninja=False)})\n"
    )
    env = dict(os.environ)
    if home is not None:
        env["CUDA_HOME"] = home
        if not env.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            env["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=directory, env=env, capture_output=not verbose, text=True
    )
    if proc.returncode != 0:
        tail = (proc.stderr or "")[-4000:] if not verbose else ""
        raise RuntimeError(f"setuptools build of the fada_core extension failed:\n{tail}")
    built = sorted(glob.glob(os.path.join(directory, build_name(with_cuda) + "*.so")))
    if not built:
        raise RuntimeError(f"setuptools build produced no shared object in {directory}")
    torch.ops.load_library(built[-1])
    return built[-1]


def _aot_spec() -> Optional[Any]:
    with contextlib.suppress(ImportError, ValueError):
        return importlib.util.find_spec("fada_core._C")
    return None


# ----------------------------------------------------------------------------- public API


def load(
    verbose: bool = False, *, force_cuda: bool = False, ptxas_verbose: bool = False, jit: bool = False
) -> None:
    """Load the compiled kernels (building them first if needed) and register their
    fake/autograd kernels. Idempotent.

    Args:
        verbose: show the compiler's output.
        force_cuda: compile the CUDA sources even with no GPU visible (as
            ``FADA_CORE_FORCE_CUDA=1``); fails if no CUDA toolkit is found.
        ptxas_verbose: pass ``-Xptxas -v`` to nvcc (register/spill report).
        jit: build with the JIT path even if an ahead-of-time ``fada_core._C`` exists.

    Raises:
        RuntimeError: with the reason, when kernels are disabled or the build or
            load fails. A failure is remembered: later calls raise the same error
            without rebuilding.
    """
    global _loaded, _origin, _library_path, _failure, _attempted, _cuda_reason, _build_dir
    with _lock:
        if _loaded:
            return
        if disabled():
            raise RuntimeError("fada_core kernels are disabled by FADA_CORE_DISABLE_KERNELS=1")
        if _attempted and _failure is not None:
            raise RuntimeError(_failure)
        _attempted = True
        _availability.clear()
        try:
            spec = None if jit else _aot_spec()
            aot_error = None
            if spec is not None and spec.origin:
                try:
                    importlib.import_module("fada_core._C")
                except (ImportError, OSError) as exc:  # e.g. built against another torch: try JIT
                    aot_error = exc
                    warnings.warn(
                        f"fada_core: the installed fada_core._C ({spec.origin}) does not load ({exc}); "
                        "building the kernels just in time instead",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            if spec is not None and spec.origin and aot_error is None:
                _origin, _library_path = "aot", spec.origin
                _cuda_reason = None if _has_kernel("CUDA") else "the installed fada_core._C was built without CUDA"
            else:
                with_cuda, _cuda_reason = cuda_decision(force=force_cuda)
                if force_cuda and not with_cuda:
                    raise RuntimeError(f"cannot build the CUDA kernels: {_cuda_reason}")
                _build_dir = build_directory(with_cuda)
                if _ensure_ninja_on_path():
                    _library_path = _jit_build(with_cuda, verbose, ptxas_verbose)
                else:
                    if verbose:
                        print("fada_core: ninja not found, building with setuptools (slower)", file=sys.stderr)
                    _library_path = _setuptools_build(with_cuda, verbose)
                _origin = "jit"
            from fada_core import ops

            ops.register()
        except Exception as exc:  # noqa: BLE001 - any build/load error becomes the reason
            _failure = _describe_failure(exc)
            raise RuntimeError(_failure) from exc
        _failure = None
        _loaded = True


def _describe_failure(exc: BaseException) -> str:
    """A short reason: the error's first line and the compiler's error lines, not the whole log."""
    lines = [line.rstrip() for line in (str(exc).strip() or type(exc).__name__).splitlines() if line.strip()]
    head, rest = lines[0], lines[1:]
    if head.startswith("Error building extension") and ": " in head:
        head = head.split(": ", 1)[0]  # drop the first ninja command echoed after it
    keys = ("error", "not found", "No such file", "undefined", "FAILED")
    picked = [line for line in rest if any(k in line for k in keys) and not line.startswith("[")]
    picked = [line if len(line) < 400 else line[:400] + " ..." for line in picked][:12]
    text = "\n".join([head] + picked) if rest else head
    hint = "" if len(lines) <= 1 else "\n(full compiler output: python -m fada_core.info --build --verbose)"
    return f"building/loading the fada_core extension failed ({type(exc).__name__}): {text}{hint}"


def _dispatch_key(device: Any) -> str:
    if isinstance(device, torch.Tensor):
        device = device.device
    device_type = torch.device(device).type if device is not None else "cpu"
    return {"cpu": "CPU", "cuda": "CUDA"}.get(device_type, device_type.upper())


def op_names() -> List[str]:
    """Qualified names of the operators the loaded library declares (empty before loading)."""
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith(_NAMESPACE + "::"))


def _is_composite(name: str) -> bool:
    """Operators with one kernel for every device (no tensors: the limits, the label-error check)."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeImplicitAutograd")
    except RuntimeError:
        return False


def _has_kernel(dispatch_key: str, op: Optional[str] = None) -> bool:
    names = [op if "::" in op else f"{_NAMESPACE}::{op}"] if op else [n for n in op_names() if not _is_composite(n)]
    if not names:
        return False
    try:
        return all(
            _is_composite(n) or torch._C._dispatch_has_kernel_for_dispatch_key(n, dispatch_key) for n in names
        )
    except RuntimeError:
        return False


def kernels_available(device: Any = "cpu", op: Optional[str] = None) -> bool:
    """Whether compiled kernels can run on ``device`` (a device, string or tensor).

    The first call loads the extension (building it if needed). On failure it
    warns once with the reason and returns False; it never raises. With ``op``
    (e.g. ``"class_center_stats"``) only that operator is checked, otherwise all
    of them.
    """
    global _warned
    try:
        key = (_dispatch_key(device), op)
    except (RuntimeError, TypeError, ValueError):
        return False
    cached = _availability.get(key)
    if cached is not None:
        return cached
    if disabled():
        return False
    with _lock:
        try:
            load()
        except RuntimeError as exc:
            if not _warned:
                _warned = True
                warnings.warn(
                    f"fada_core: compiled kernels unavailable, using the eager backend. {exc}",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return False
        except Exception:  # noqa: BLE001 - never raise from a capability query
            return False
        result = _has_kernel(key[0], op)
        _availability[key] = result
        return result


def is_loaded() -> bool:
    return _loaded


def failure_reason() -> Optional[str]:
    """Why the kernels are not loaded (``None`` when loaded or not tried yet)."""
    if disabled() and not _loaded:
        return "disabled by FADA_CORE_DISABLE_KERNELS=1"
    return _failure


def status() -> Dict[str, Any]:
    """What a user has: versions, toolchain, and whether/which kernels are loaded. Loads nothing."""
    cpp_extension = _cpp_extension()

    home = cuda_home()
    include_cuda, cuda_reason = cuda_decision()
    ops_devices: Dict[str, List[str]] = {}
    if _loaded:
        for name in op_names():
            if _is_composite(name):
                ops_devices[name] = ["any (device-independent)"]
            else:
                ops_devices[name] = [k.lower() for k in ("CPU", "CUDA") if _has_kernel(k, name)]
    cuda_kernels = any("cuda" in devices for devices in ops_devices.values())
    spec = _aot_spec()
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else [],
        "cuda_home": home,
        "nvcc": _nvcc_version(home) if home else None,
        "cxx": _first_line([_cxx(), "--version"]),
        "ninja": cpp_extension.is_ninja_available() or _ensure_ninja_on_path(),
        "torch_cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST")
        or (None if torch.cuda.is_available() else f"{DEFAULT_CUDA_ARCH_LIST} (default)"),
        "disabled": disabled(),
        "aot_extension": spec.origin if spec is not None else None,
        "loaded": _loaded,
        "origin": _origin,
        "library": _library_path,
        "failure": failure_reason(),
        "cuda_kernels": cuda_kernels,
        "cuda_kernels_reason": None if cuda_kernels else (_cuda_reason or "not built") if _loaded else cuda_reason,
        "would_build_cuda": include_cuda,
        "build_dir": os.path.dirname(_library_path) if _library_path else _build_dir or build_directory(include_cuda),
        "ops": ops_devices,
    }
