"""Metadata lives in setup.cfg; this file only adds the compiled extension on request.

By default the install is pure Python and the kernels are JIT-built on first use
(see fada_core/_build.py). To build them at install time instead:

    FADA_CORE_BUILD_EXT=1 pip install --no-build-isolation .

(``--no-build-isolation`` so the extension is compiled against the installed
torch). The result is the library the JIT build gives (same sources and
flags, fada_core/_compile.py): CPU kernels for every instruction set, picked at
run time, so no ``-march=native`` is needed. The CUDA sources are included when
a GPU is visible or ``FADA_CORE_FORCE_CUDA=1``; with no GPU visible
``TORCH_CUDA_ARCH_LIST`` defaults to "8.0;9.0+PTX".
"""

import importlib.util
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name):  # (as fada_core._compile.env_flag, which needs torch to import)
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _load_compile():
    """fada_core/_compile.py (sources, flags and toolkit lookup, shared with the JIT
    build), loaded without importing the package; None without FADA_CORE_BUILD_EXT=1."""
    if not _flag("FADA_CORE_BUILD_EXT"):
        return None
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            "FADA_CORE_BUILD_EXT=1 needs torch at build time: install torch first and run pip "
            "with --no-build-isolation"
        ) from exc
    spec = importlib.util.spec_from_file_location("_fada_core_compile", os.path.join(HERE, "fada_core", "_compile.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build


build = _load_compile()
if build is None:
    setup()
else:
    with_cuda, reason = build.cuda_decision()
    if not with_cuda:
        print(f"fada_core: building the CPU kernels only ({reason})")
    if with_cuda:
        build.use_cuda_toolkit()
    setup(ext_modules=[build.extension(with_cuda)], cmdclass={"build_ext": build.cpp_extension().BuildExtension})
