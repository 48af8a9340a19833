"""Metadata lives in setup.cfg; this file only adds the compiled extension on request.

By default the install is pure Python and the kernels are JIT-built on first use
(see fada_core/_build.py). To build them at install time instead:

    FADA_CORE_BUILD_EXT=1 pip install --no-build-isolation .

(``--no-build-isolation`` so the extension is compiled against the installed
torch). The CUDA sources are included when a GPU is visible or
``FADA_CORE_FORCE_CUDA=1``; with no GPU visible ``TORCH_CUDA_ARCH_LIST``
defaults to "8.0;9.0+PTX".
"""

import importlib.util
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _extension_kwargs():
    if not _flag("FADA_CORE_BUILD_EXT"):
        return {}
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            "FADA_CORE_BUILD_EXT=1 needs torch at build time: install torch first and run pip "
            "with --no-build-isolation"
        ) from exc
    # The build logic (sources, flags, CUDA toolkit lookup) is shared with the JIT
    # path; load that one file without importing the fada_core package.
    spec = importlib.util.spec_from_file_location(
        "_fada_core_build", os.path.join(HERE, "fada_core", "_build.py")
    )
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    cpp_extension = build._cpp_extension()

    with_cuda, reason = build.cuda_decision()
    if not with_cuda:
        print(f"fada_core: building the CPU kernels only ({reason})")
    sources = [os.path.relpath(s, HERE) for s in build.sources(with_cuda)]
    include_dirs = [build._CSRC]
    extra_compile_args = {"cxx": build.cflags(native=False)}
    if with_cuda:
        home = build.cuda_home()
        cpp_extension.CUDA_HOME = home
        os.environ["CUDA_HOME"] = home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = build.DEFAULT_CUDA_ARCH_LIST
        # headers the toolkit lacks (cuBLAS, ...), searched after its own
        fallback = [f for d in build._cuda_extra_include_paths(home) for f in ("-isystem", d)]
        extra_compile_args["cxx"] += fallback
        extra_compile_args["nvcc"] = build.cuda_cflags() + fallback
        extension = cpp_extension.CUDAExtension
    else:
        extension = cpp_extension.CppExtension
    ext = extension(
        name="fada_core._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args=extra_compile_args,
        extra_link_args=["-fopenmp"],
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(**_extension_kwargs())
