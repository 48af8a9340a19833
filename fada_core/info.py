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
import sys
from typing import Any, Dict, List, Optional


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
        ("ninja", status["ninja"]),
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

    from fada_core import _build

    error: Optional[str] = None
    build = args.build or args.cuda
    if build or not args.no_load:
        try:
            _build.load(verbose=args.verbose or args.cuda, force_cuda=args.cuda, ptxas_verbose=args.cuda,
                        jit=args.build, build=build)
        except RuntimeError as exc:
            error = str(exc)
    status = _build.status()
    if args.json:
        print(json.dumps(status, indent=2, default=str))
    else:
        _print_status(status)
        if build or not args.no_load:
            _print_kernels(status, error)
    if build and error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.cuda and not status["cuda_kernels"]:
        print(f"error: CUDA kernels were not built: {status['cuda_kernels_reason']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
