"""Shared test fixtures.

``kernel_ops``: the compiled ``torch.ops.fada_core`` namespace. The extension is
built/loaded on first use; if that fails the test is skipped, unless
``FADA_CORE_REQUIRE_KERNELS=1`` (CI), where it fails with the build error.
``isa_kernel_ops``: the same, once per instruction-set build of the CPU kernels
(default, avx2, avx512; those this CPU cannot run are skipped), so a dispatch
bug cannot hide behind the widest one.

``@pytest.mark.cuda``: skipped when no CUDA device is visible.

Hypothesis profiles, chosen with ``HYPOTHESIS_PROFILE`` (default ``dev``):
``ci`` runs at least 200 examples per property, derandomized (reproducible);
``dev`` uses hypothesis' defaults. Neither has a deadline (first calls build
or compile).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile(
    "dev", deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def _require_kernels() -> bool:
    return os.environ.get("FADA_CORE_REQUIRE_KERNELS", "").strip().lower() in ("1", "true", "yes", "on")


@pytest.fixture(scope="session")
def kernel_ops():
    """``torch.ops.fada_core`` with the compiled kernels loaded."""
    from fada_core import _build

    try:
        _build.load()
    except RuntimeError as exc:
        if _require_kernels():
            pytest.fail(f"FADA_CORE_REQUIRE_KERNELS=1 but the kernels did not load: {exc}", pytrace=False)
        pytest.skip(f"fada_core kernels unavailable: {exc}")
    return torch.ops.fada_core


@pytest.fixture(params=["default", "avx2", "avx512"])
def isa_kernel_ops(request, kernel_ops):
    """``kernel_ops`` with the CPU kernels of the instruction-set build ``request.param``."""
    from fada_core import _build

    supported = _build.cpu_capability()["supported"]
    if request.param not in supported:
        pytest.skip(f"this CPU runs only the {', '.join(supported)} builds")
    with _build.use_cpu_capability(request.param):
        yield kernel_ops


@pytest.fixture(scope="session")
def emulated_cuda_ops():
    """fada_core's CUDA ops compiled as host code (``torch.ops.fada_core_emulated``).

    ``tests/cuda_emulation``: CUDA threads run as host threads, so the kernels' indexing, barriers
    and fixed-order reductions are tested on the CPU. Needs only a C++ compiler.
    """
    from torch.utils.cpp_extension import load

    here = os.path.dirname(os.path.abspath(__file__))
    csrc = os.path.join(os.path.dirname(here), "fada_core", "csrc")
    try:
        load(
            name="fada_core_cuda_emulation",
            sources=[os.path.join(here, "cuda_emulation", "emulated_ops.cpp")],
            extra_include_paths=[csrc, os.path.join(here, "cuda_emulation")],
            extra_cflags=["-O1", "-DFADA_CUDA_EMULATION"],
            is_python_module=False,
        )
    except Exception as exc:  # no compiler, or the sources do not build as host code
        if _require_kernels():
            pytest.fail(f"FADA_CORE_REQUIRE_KERNELS=1 but the CUDA emulation did not build: {exc}", pytrace=False)
        pytest.skip(f"CUDA emulation unavailable: {exc}")
    return torch.ops.fada_core_emulated


@pytest.fixture
def cuda_kernel_ops(kernel_ops):
    """Like ``kernel_ops``, and also requires CUDA kernels and a visible GPU."""
    from fada_core import _build

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not _build.kernels_available("cuda"):
        if _require_kernels():
            pytest.fail(f"CUDA kernels not loaded: {_build.status()['cuda_kernels_reason']}", pytrace=False)
        pytest.skip(f"CUDA kernels not loaded: {_build.status()['cuda_kernels_reason']}")
    return kernel_ops


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip_cuda)
