"""Is an AOT build of the CPU kernels the same machine code as the JIT build?

    FADA_CORE_BUILD_EXT=1 python setup.py build_ext --inplace      # the AOT library: fada_core/_C*.so
    python -m fada_core.info --build                                # the JIT library (path in its report)
    python benchmarks/compare_builds.py JIT.so AOT.so

Disassembles both libraries (binutils' ``objdump``) and compares, function by function, every
function of the instruction-set builds (the ``fada_cpu_<isa>`` namespaces, csrc/cpu/isa/*.cpp):
the instructions with addresses, jump targets and alignment padding taken out, since those move
whenever anything else in the library changes size. Same instructions, same speed: this answers
"is the pip-installed library as fast as the JIT one?" without timing anything. Exit status 1
when a kernel function differs or exists in one library only.
"""

import argparse
import os
import re
import subprocess
import sys
from collections import Counter
from typing import Dict, List

_HEADER = re.compile(r"^[0-9a-f]+ <(.+)>:$")
_ISA = re.compile(r"fada_cpu_(default|avx512|avx2)")  # also inside mangled names (OpenMP bodies)


def _normalise(instruction: str) -> str:
    instruction = instruction.split("#")[0]                      # objdump's symbol comments
    instruction = re.sub(r"\b[0-9a-f]+ <.*", "TARGET", instruction)  # jump/call targets
    instruction = re.sub(r"-?0x[0-9a-f]+\(%rip\)", "RIP", instruction)
    return " ".join(instruction.split())


def kernel_functions(library: str) -> Dict[str, List[str]]:
    """Normalised instructions of every function of the ISA builds, by demangled name."""
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", library], check=True,
                             capture_output=True, text=True).stdout
    functions: Dict[str, List[str]] = {}
    body: List[str] = []
    for line in listing.splitlines():
        header = _HEADER.match(line)
        if header:
            name = header.group(1)
            keep = "fada_cpu_" in name.split("(")[0] and not name.endswith("@plt")
            body = functions.setdefault(name, []) if keep else []
        elif "\t" in line:
            instruction = _normalise(line.split("\t", 1)[1])
            if instruction and not instruction.startswith(("nop", "cs nop", "data16", "xchg %ax,%ax", "int3")):
                body.append(instruction)
    return functions


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", help="a fada_core CPU library (.so), e.g. the JIT build")
    parser.add_argument("second", help="another, e.g. the AOT build (fada_core/_C*.so)")
    args = parser.parse_args(argv)
    for path in (args.first, args.second):
        if not os.path.isfile(path):
            parser.error(f"no such library: {path}")
    a, b = kernel_functions(args.first), kernel_functions(args.second)
    same, differ, alone = Counter(), Counter(), sorted(set(a) ^ set(b))
    for name in set(a) & set(b):
        isa = _ISA.search(name).group(1)
        (same if a[name] == b[name] else differ)[isa] += 1
    for isa in sorted(set(same) | set(differ)):
        print(f"{isa:8s} build: {same[isa]} functions identical, {differ[isa]} differ")
    for name in sorted(n for n in set(a) & set(b) if a[n] != b[n])[:10]:
        print(f"  differs: {name[:160]} ({len(a[name])} vs {len(b[name])} instructions)")
    for name in alone[:10]:
        print(f"  in one library only: {name[:160]}")
    identical = not differ and not alone and bool(same)
    print("same machine code" if identical else "the builds differ")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
