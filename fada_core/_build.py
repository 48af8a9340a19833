"""Load the compiled ``torch.ops.fada_core`` kernels, say what is loaded, and pick the CPU
instruction-set build; nothing happens at import.

Where the kernels come from, first match wins:

1. nowhere, with ``FADA_CORE_DISABLE_KERNELS=1`` (the eager backend only);
2. the ahead-of-time build ``fada_core._C``, made by
   ``FADA_CORE_BUILD_EXT=1 pip install --no-build-isolation .`` (setup.py takes
   :func:`fada_core._compile.extension`);
3. a just-in-time build (:func:`fada_core._compile.jit_build`, needs ninja) cached in
   ``TORCH_EXTENSIONS_DIR``; it announces itself on stderr when it compiles.

What is compiled, and how, is :mod:`fada_core._compile`. The CPU kernels are built once per
instruction set; one is picked when the library loads (:func:`cpu_capability`). A failed build is
remembered in ``_state``: the ``"auto"`` backend then warns once and runs eager, ``backend="kernel"``
raises with the reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import importlib
import importlib.util
import os
import threading
import warnings
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from fada_core import _compile


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


def disabled() -> bool:
    """True when ``FADA_CORE_DISABLE_KERNELS=1`` asks for the eager backend only."""
    return _compile.env_flag("FADA_CORE_DISABLE_KERNELS")


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
        with_cuda, no_cuda_reason = _compile.cuda_decision(force=force_cuda)
        if library is None and not build and _compile.needs_compile(with_cuda):
            raise RuntimeError(f"not built yet (no up-to-date JIT build in "
                               f"{_compile.build_directory(with_cuda)}; python -m fada_core.info --build builds it)")
        try:
            if library is None and force_cuda and not with_cuda:
                raise RuntimeError(f"cannot build the CUDA kernels: {no_cuda_reason}")
            origin = "jit" if library is None else "aot"
            library = library or _compile.jit_build(with_cuda, verbose, ptxas_verbose)
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
    loaded = is_loaded()
    ops = op_devices() if loaded else {}
    cuda_kernels = any("cuda" in devices for devices in ops.values())
    would_build_cuda, no_cuda_reason = _compile.cuda_decision()
    return {
        "disabled": disabled(), "aot_extension": aot_extension(), "loaded": loaded, "origin": _state.origin,
        "library": _state.library, "failure": failure_reason(),
        "cpu_capability": cpu_capability() if loaded else None, "ops": ops, "cuda_kernels": cuda_kernels,
        "cuda_kernels_reason": None if cuda_kernels else _state.no_cuda_reason if loaded else no_cuda_reason,
        "would_build_cuda": would_build_cuda,
        "build_dir": os.path.dirname(_state.library) if loaded else _compile.build_directory(would_build_cuda),
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
