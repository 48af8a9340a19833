"""``python -m fada_core.info``: what fada_core has to work with, and whether its kernels load.

Prints the torch/CUDA/nvcc/compiler versions, then loads the compiled kernels if
they are already built (installed ahead of time, or an up-to-date JIT build in
the cache; it never compiles without --build) and says which devices have them,
or why not, and which instruction-set build of the CPU kernels runs and why
(``FADA_CORE_CPU_CAPABILITY=default|avx2|avx512`` picks one; by default the
widest this CPU runs). Options:

  --build      build now (JIT cache); exit status 1 with the reason on failure
  --cuda       include the CUDA sources even with no GPU visible, and print nvcc's
               register/spill report (-Xptxas -v); for build machines and CI, e.g.
               TORCH_CUDA_ARCH_LIST="8.0;9.0" python -m fada_core.info --build --cuda
  --no-load    only report versions; do not load anything
  --json       print the status as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any, Dict, List, Optional

import torch

from fada_core import _build, _compile


def _version_line(cmd: List[str], containing: str = "") -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return next((line.strip() for line in out.splitlines() if line.strip() and containing in line), None)


def _ninja_version() -> Optional[str]:
    try:
        _compile.ensure_ninja()  # (finds the pip package's ninja next to the interpreter, as a build does)
    except RuntimeError:
        return None
    return _version_line(["ninja", "--version"])


def status() -> Dict[str, Any]:
    """What a user has: versions, toolchain, and whether and which kernels are loaded
    (:func:`fada_core._build.status`). Loads nothing."""
    home = _compile.cuda_home()
    with_gpu = torch.cuda.is_available()
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": with_gpu,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cuda_home": home,
        "nvcc": _version_line([os.path.join(home, "bin", "nvcc"), "--version"], "release") if home else None,
        "cxx": _version_line([os.environ.get("CXX", "c++"), "--version"]),
        "ninja": _ninja_version(),
        "torch_cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST")
        or (None if with_gpu else f"{_compile.DEFAULT_CUDA_ARCH_LIST} (default)"),
        **_build.status(),
    }


def _print_status(status: Dict[str, Any]) -> None:
    rows = [
        ("python", status["python"]),
        ("torch", status["torch"]),
        ("torch CUDA", status["torch_cuda"] or "none (CPU-only build)"),
        ("CUDA available", status["cuda_available"]),
        ("CUDA devices", ", ".join(status["cuda_devices"]) or "none"),
        ("CUDA_HOME", status["cuda_home"] or "not found"),
        ("nvcc", status["nvcc"] or "not found"),
        ("C++ compiler", status["cxx"] or "not found"),
        ("ninja", status["ninja"] or "not found (pip install ninja)"),
        ("TORCH_CUDA_ARCH_LIST", status["torch_cuda_arch_list"] or "auto (visible GPUs)"),
        ("AOT extension", status["aot_extension"] or "none"),
        ("build dir", status["build_dir"]),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def _print_kernels(status: Dict[str, Any], error: Optional[str]) -> None:
    if status["disabled"]:
        print("kernels: disabled (FADA_CORE_DISABLE_KERNELS=1); the eager backend is used")
        return
    if not status["loaded"]:
        print(f"kernels: NOT loaded: {status['failure'] or error or 'not tried'}")
        return
    print(f"kernels: loaded ({status['origin']}) from {status['library']}")
    cpu = status["cpu_capability"]
    print(f"CPU kernels: {cpu['in_use']} build ({cpu['reason']}; this CPU runs: {', '.join(cpu['supported'])})")
    devices = sorted({d for ds in status["ops"].values() for d in ds})
    print(f"devices with kernels: {', '.join(devices) or 'none'}")
    for name, devs in status["ops"].items():
        print(f"  {name}: {', '.join(devs) or 'no kernels'}")
    if not status["cuda_kernels"]:
        print(f"CUDA kernels: no ({status['cuda_kernels_reason']})")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fada_core.info", description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="store_true", help="build the kernels now; non-zero exit on failure")
    parser.add_argument("--cuda", action="store_true", help="force the CUDA sources and print ptxas -v")
    parser.add_argument("--no-load", action="store_true", help="report versions only")
    parser.add_argument("--verbose", "-v", action="store_true", help="show compiler output")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    args = parser.parse_args(argv)

    error: Optional[str] = None
    build = args.build or args.cuda
    if build or not args.no_load:
        try:
            _build.load(verbose=args.verbose or args.cuda, force_cuda=args.cuda, ptxas_verbose=args.cuda,
                        build=build)
        except RuntimeError as exc:
            error = str(exc)
    report = status()
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        _print_status(report)
        if build or not args.no_load:
            _print_kernels(report, error)
    if build and error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.cuda and not report["cuda_kernels"]:
        print(f"error: CUDA kernels were not built: {report['cuda_kernels_reason']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
