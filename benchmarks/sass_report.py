"""Static cost of the CUDA kernels: registers, spills and SASS instructions per output, no GPU needed.

Compiles every ``fada_core/csrc/cuda/*.cu`` for one architecture (default sm_90) against torch's
headers with the library's own nvcc flags, disassembles the cubin (``nvdisasm``, with line info)
and prints, per kernel: registers and spill bytes (ptxas), SASS instructions, loops, and, where a
trip-count model below covers the kernel, SASS instructions per output (per output pixel for the
losses) at the benchmark shape B=4, K=19, 64x128 -> 512x1024.

How the per-output figure is derived:

1. Loops are found in the SASS: a branch back to an earlier label closes a loop; loops nest by
   address range. Each instruction counts once, in its innermost loop (or at top level).
2. Each SASS loop is tied to a source loop by the line info of its back branch: that line's text
   is matched against the kernel's model (``MODELS``), which gives the source loop's trip count
   per execution of its enclosing loop at the benchmark shape (and its source step, e.g. 4 for
   ``y0 += kRows``).
3. Unrolling: the loop's induction register is found (compared in the loop, directly or through
   one add, and incremented by an immediate); increment / source step = unroll factor u (taken as
   1 above 16 or for loops that run at most once per thread: that step is a pointer's). The most unrolled loop on a line runs
   floor(trips / u) times, other loops on the line (remainders) take what is left in turn; a
   peeled remainder is straight code of the enclosing loop and counted with it.
4. Per thread: sum of (instructions in loop x executions of its body); top-level code counts once
   (both sides of every branch: an upper bound), except the subroutines nvcc appends for slow
   paths (64-bit division when an operand exceeds 32 bits); an outermost loop whose first
   iteration was peeled into the code before it runs one iteration fewer. Times the threads launched (the model's
   ``threads``), divided by the outputs (``outputs``). Loops with no model are listed and left
   out (the figure is then a lower bound, marked "+").

Needs nvcc (``CUDA_HOME``, default /usr/local/cuda) and the ``nvidia-cuda-nvdisasm`` wheel (the
``bench`` extra: ``pip install -e ".[bench]"``) or nvdisasm on the PATH. Run::

    python benchmarks/sass_report.py               # all kernels, sm_90
    python benchmarks/sass_report.py --csrc OTHER  # another source tree (e.g. an older commit)
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

SHAPE = dict(B=4, K=19, h=64, w=128, H=512, W=1024)  # the benchmark's FADA loss shape


# ----------------------------------------------------------------------------- SASS parsing


@dataclass
class Instruction:
    text: str
    file: str
    line: int


@dataclass
class Loop:
    start: int  # index of the first instruction (the back branch's target)
    end: int  # index of the back branch
    file: str
    line: int  # source line of the back branch
    step: int = 1  # increment of the induction register (1 if none found)
    parent: Optional[int] = None
    exclusive: int = 0  # instructions in this loop and in none nested in it


@dataclass
class Function:
    name: str
    instructions: List[Instruction] = field(default_factory=list)
    loops: List[Loop] = field(default_factory=list)
    subroutine_instructions: int = 0  # in CALL targets outside every loop


_FILE_LINE = re.compile(r'\s*//## File "(.*)", line (\d+)')
_LABEL = re.compile(r"^(\.L_x_\d+|\$\S+):")
_INSTR = re.compile(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;")
_BACK_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")
_COMPARE = re.compile(r"\bU?ISETP\S*\s+U?P\w+,\s*U?P\w+,\s*(U?R\w+)(?:,\s*(U?R\w+))?")
_INCREMENT = re.compile(r"\b(?:U?IADD3|VIADD)\s+(U?R\d+),\s*(?:U?P\d+,\s*)?(U?R\d+),\s*(-?0x[0-9a-f]+|-?\d+)\b")


def parse_sass(text: str) -> Dict[str, Function]:
    """nvdisasm -g output -> functions with their instructions (source file, line) and loops."""
    functions: Dict[str, Function] = {}
    for section in text.split("//--------------------- .text.")[1:]:
        name = section.split(" ", 1)[0].strip()
        fn = Function(name)
        labels: Dict[str, int] = {}
        where = ("?", 0)
        for raw in section.splitlines():
            m = _FILE_LINE.match(raw)
            if m:
                where = (os.path.basename(m.group(1)), int(m.group(2)))
                continue
            m = _LABEL.match(raw)
            if m:
                labels[m.group(1)] = len(fn.instructions)
                continue
            m = _INSTR.match(raw)
            if m:
                fn.instructions.append(Instruction(m.group(1), *where))
        while fn.instructions and fn.instructions[-1].text == "NOP":  # alignment padding, never executed
            fn.instructions.pop()
        _find_subroutines(fn, labels)
        _find_loops(fn, labels)
        functions[name] = fn
    return functions


def _find_subroutines(fn: Function, labels: Dict[str, int]) -> None:
    """Counts the instructions of the called subroutines nvcc appends to a kernel (``$__internal_*``
    labels, e.g. 64-bit division, and ``$kernel$function`` for a ``__noinline__`` device function
    such as a rarely taken exact path): from the first of them to the end."""
    starts = [i for name, i in labels.items() if name.startswith("$")]
    fn.subroutine_instructions = len(fn.instructions) - min(starts) if starts else 0


def _peeled(fn: Function, k: int) -> bool:
    """Whether an outermost loop's first iteration was peeled into the code before it: at least
    half as many top-level instructions before the loop come from the loop body's source lines."""
    lp = fn.loops[k]
    body = {(i.file, i.line) for i in fn.instructions[lp.start : lp.end + 1]}
    before = [i for i in fn.instructions[: lp.start] if (i.file, i.line) in body]
    return lp.parent is None and len(before) >= (lp.end - lp.start + 1) / 2


def _find_loops(fn: Function, labels: Dict[str, int]) -> None:
    end = len(fn.instructions) - fn.subroutine_instructions  # loops of the subroutines are not the kernel's
    for i, ins in enumerate(fn.instructions[:end]):
        m = _BACK_BRANCH.search(ins.text)
        if m and labels.get(m.group(1), len(fn.instructions)) <= i:
            start = labels[m.group(1)]
            if start == i and "@" not in ins.text:  # the trap loop at the end of every kernel
                continue
            fn.loops.append(Loop(start, i, ins.file, ins.line, _induction_step(fn.instructions[start : i + 1])))
    fn.loops.sort(key=lambda lp: (lp.start, -lp.end))
    for k, lp in enumerate(fn.loops):
        enclosing = [j for j, o in enumerate(fn.loops) if j != k and o.start <= lp.start and lp.end <= o.end
                     and (o.end - o.start) > (lp.end - lp.start)]
        lp.parent = min(enclosing, key=lambda j: fn.loops[j].end - fn.loops[j].start) if enclosing else None
    for k, lp in enumerate(fn.loops):
        children = [o for o in fn.loops if o.parent == k]
        lp.exclusive = (lp.end - lp.start + 1) - sum(o.end - o.start + 1 for o in children)


def _induction_step(body: List[Instruction]) -> int:
    """The immediate added to the loop's counter: a register incremented by itself plus an
    immediate that the loop compares, directly or through one add (``c + offset``); 1 if none."""
    compared = set()
    for ins in body:
        m = _COMPARE.search(ins.text)
        if m:  # both operands: a down-counter is compared as (RZ, counter)
            compared.update(r for r in m.group(1, 2) if r and r not in ("RZ", "URZ"))
    feeds = set()  # registers added into a compared one
    for ins in body:
        m = re.search(r"\b(?:U?IADD3|VIADD|IMAD\.IADD)\S*\s+(U?R\d+),\s*(?:U?P\d+,\s*)?(-?U?R\d+),\s*(-?U?R\d+)", ins.text)
        if m and m.group(1) in compared:
            feeds.update(r.lstrip("-") for r in m.group(2, 3))
    for wanted in (compared, feeds):
        for ins in reversed(body):
            m = _INCREMENT.search(ins.text)
            if m and m.group(1) == m.group(2) and m.group(1) in wanted:
                step = int(m.group(3), 0)
                step = step - (1 << 32) if step >= 1 << 31 else step  # 32-bit immediates: 0xfffffffc is -4
                return abs(step) if step else 1
    return 1


def top_level_count(fn: Function) -> int:
    """Instructions outside every loop and every called subroutine (slow paths such as 64-bit
    division, reached by CALL only when a fast path does not apply: each CALL counts as one)."""
    outside = len(fn.instructions) - sum(lp.end - lp.start + 1 for lp in fn.loops if lp.parent is None)
    return outside - fn.subroutine_instructions


_PTXAS_ENTRY = re.compile(r"Function properties for (\S+)")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(log: str) -> Dict[str, Tuple[int, int, int]]:
    """ptxas -v output -> {function: (registers, spill store bytes, spill load bytes)}."""
    out: Dict[str, Tuple[int, int, int]] = {}
    name, spills = None, (0, 0)
    for raw in log.splitlines():
        m = _PTXAS_ENTRY.search(raw)
        if m:
            name = m.group(1)
            continue
        m = _PTXAS_SPILL.search(raw)
        if m and name:
            spills = (int(m.group(1)), int(m.group(2)))
            continue
        m = _PTXAS_REGS.search(raw)
        if m and name:
            out[name] = (int(m.group(1)), *spills)
            name, spills = None, (0, 0)
    return out


# ----------------------------------------------------------------------------- trip-count models


def _f32(x) -> np.float32:
    return np.float32(x)


def source_i0(in_size: int, out_size: int) -> List[int]:
    """i0 of every output index, in float32 as the kernels compute it (align_corners=True)."""
    scale = _f32(in_size - 1) / _f32(out_size - 1) if out_size > 1 else _f32(0)
    return [min(int(_f32(scale) * _f32(o)), in_size - 1) for o in range(out_size)]


def fada_staged_smem(K: int, nx: int, ns: int) -> int:
    """Bytes of a float32 FADA loss staged block (staged_layout in csrc/cuda/fada_loss_kernel.cu)."""
    return (3 * K * nx * 2 + 2 * K * nx * 2 + 3 * K * 2 * ns + 2 * 2 * K * 2 * ns + nx) * 4 + (ns + 1 + 2) * 4


def ce_staged_smem(K: int, nx: int, ns: int) -> int:
    """Bytes of a float32 cross-entropy staged block (ce_staged_layout in csrc/cuda/cross_entropy_kernel.cu)."""
    return (K * nx * 2 + K * nx * 2 + K * 2 * ns + 2 * K * 2 * ns + nx) * 4 + (ns + 1 + 2) * 4


def staged_config(K: int, w: int, W: int, smem_of: Callable[[int, int, int], int] = fada_staged_smem,
                  smem_limit: int = 227 * 1024) -> Tuple[int, int]:
    """(tj, nx) as choose_staged_config picks them (csrc/cuda/staged_rows.cuh) for float32."""
    i0 = source_i0(w, W)
    first = [next((o for o in range(W) if i0[o] >= j), W) for j in range(w + 1)]
    best, best_cost = None, None
    for tj in range(1, min(32, w) + 1):
        widest = max(first[min(j0 + tj, w)] - first[j0] for j0 in range(0, w, tj))
        nx = 32
        while nx < 128 and nx < widest:
            nx *= 2
        if smem_of(K, nx, tj + 1) > smem_limit:
            continue
        cost = -(-w // tj) * nx * max(1, -(-widest // nx))
        if best_cost is None or cost <= best_cost:
            best, best_cost = (tj, nx), cost
    return best


def old_adjoint_config(C: int, w: int, W: int) -> Tuple[int, int]:
    """(tj, nx) as adjoint_config picks them (csrc/cuda/upsample_common.cuh) for float32."""
    seg_max = -(-(W - 1) // (w - 1)) if w > 1 else W
    for nx in (128, 64, 32):
        tj = max(1, min(32, nx // max(seg_max, 1) - 1))
        if (2 * C * nx + 2 * C * tj) * 4 + 2 * tj * 8 <= 48 * 1024:
            return tj, nx
    return 1, 32


@dataclass
class Model:
    """Trip counts of one kernel at the benchmark shape: (regex on the loop's source line, trips, step);
    step 0: a loop strided by a register (``e += blockDim.x``), which nvcc does not unroll."""

    threads: float
    outputs: float
    trips: List[Tuple[str, float, int]]


def fada_models() -> Dict[str, Callable[[], Model]]:
    B, K, h, w, H, W = (SHAPE[k] for k in ("B", "K", "h", "w", "H", "W"))
    C = 2 * K
    pixels = B * H * W
    search = math.ceil(math.log2(W)) + 1  # binary searches over output indices
    cols_per_source = W / w
    rows_per_group = H / h
    i0y = source_i0(h, H)
    groups = [i0y.count(r) for r in range(h)]
    # fada_staged_kernel: passes of 8, then 4, then 1 rows per row group (on average per group)
    passes = {8: sum(n // 8 for n in groups) / h, 4: sum(n % 8 // 4 for n in groups) / h,
              1: sum(n % 4 for n in groups) / h}
    tj, nx = staged_config(K, w, W)
    ns = tj + 1
    tiles = -(-w // tj)
    otj, onx = old_adjoint_config(C, w, W)
    common = [(r"while \(lo < hi\)", search, 1), (r"for \(int stride = blockDim.x / 2", math.log2(nx), 1)]

    def staged() -> Model:
        return Model(
            threads=B * h * tiles * nx,
            outputs=pixels,
            trips=common
            + [
                # staged_ranges: the nj + 3 searches run in the first warps only (lanes of warps past them skip it)
                (r"for \(int64_t jj = threadIdx.x; jj <= t.nj", math.ceil((tj + 3) / 32) * 32 / nx, 0),
                (r"for \(int e = threadIdx.x; e < total;", 1.5 * K * 2 * ns / nx, 1),  # disc (2K), seg (K) rows
                (r"for \(int cx0 = xa", 1, 1),
                (r"for \(int c = 0; c < channels; \+\+c", 1.5 * K, 1),  # interpolate_column: 2K, then K
                (r"for \(; y0 \+ 8 <= yb; y0 \+= 8\)", passes[8], 8),
                (r"for \(; y0 \+ 4 <= yb; y0 \+= 4\)", passes[4], 4),
                (r"for \(; y0 < yb; \+\+y0\)", passes[1], 1),
                (r"for \(int c = 0; c < 2 \* k; \+\+c, ", C, 1),
                (r"for \(int c = 0; c < k; \+\+c, ", K, 1),
                (r"e < ch \* nj; e \+= blockDim.x", C * (ns - 1) / nx, 0),  # staged_adjoint, staged_write_slots
                (r"for \(int x = lo; x < hi", cols_per_source, 1),
                (r"e < 2 \* ch; e \+= blockDim.x", 2 * C / nx, 0),  # staged_write_slots: spills
                (r"for \(int tb = 0; tb < 2", 2, 1),
            ],
        )

    def forward() -> Model:
        return Model(
            threads=pixels,
            outputs=pixels,
            trips=[
                (r"for \(int64_t idx = ", 1, 1),
                (r"for \(int64_t c = 0; c < g.K; \+\+c\)", K, 1),
                (r"for \(int64_t c = 0; c < 2 \* g.K", C, 1),
                (r"for \(int stride = blockDim.x / 2", 8, 1),
            ],
        )

    def backward() -> Model:
        return Model(
            threads=B * h * -(-w // otj) * onx,
            outputs=pixels,
            trips=[
                (r"while \(lo < hi\)", search, 1),
                (r"for \(int64_t cx0 = blk.xa", 1, 1),
                (r"for \(int64_t y = blk.ya", rows_per_group, 1),
                (r"for \(int64_t c = 0; c < g.K; \+\+c\)", K, 1),
                (r"for \(int64_t c = 0; c < 2 \* g.K", C, 1),
                (r"for \(int64_t c = 0; c < C; \+\+c\)", C, 1),
                (r"for \(int64_t c = 0; c < blk.channels", C, 1),
                (r"e < channels \* tj", math.ceil(C * otj / onx), 1),
                (r"jj < blk.nj", 1, 1),
                (r"e < blk.channels \* blk.nj", math.ceil(C * otj / onx), 1),
                (r"for \(int64_t xx = lo", 2 * cols_per_source, 1),
            ],
        )

    def gather() -> Model:  # one thread per low-resolution gradient element
        return Model(threads=B * C * h * w, outputs=pixels, trips=[(r"for \(int64_t idx = ", 1, 1)])

    def reduce_partials() -> Model:
        partials = tiles * h * B
        return Model(threads=1024, outputs=pixels,
                     trips=[(r"i < n; i \+= blockDim.x", partials / 1024, 1), (r"for \(int stride", 10, 1)])

    return {
        "fada_staged_kernel": staged,
        "fada_forward_kernel": forward,
        "fada_backward_kernel": backward,
        "staged_gather_kernel": gather,
        "gather_partials_kernel": gather,
        "reduce_partials_kernel": reduce_partials,
    }


def ce_models() -> Dict[str, Callable[[], Model]]:
    """The upsampled cross-entropy's kernels (csrc/cuda/cross_entropy_kernel.cu) at the same shape."""
    B, K, h, w, H, W = (SHAPE[k] for k in ("B", "K", "h", "w", "H", "W"))
    pixels = B * H * W
    search = math.ceil(math.log2(W)) + 1
    cols_per_source = W / w
    rows_per_group = H / h
    i0y = source_i0(h, H)
    groups = [i0y.count(r) for r in range(h)]
    batches = sum(-(-n // 4) for n in groups) / h
    # float32; the block sums' static shared memory (2 x 128 x (4 + 8) bytes) comes off the limit
    tj, nx = staged_config(K, w, W, ce_staged_smem, 227 * 1024 - 128 * 12)
    ns = tj + 1
    tiles = -(-w // tj)
    otj, onx = old_adjoint_config(K, w, W)

    def staged() -> Model:
        return Model(
            threads=B * h * tiles * nx,
            outputs=pixels,
            trips=[
                (r"while \(lo < hi\)", search, 1),
                (r"for \(int stride = blockDim.x / 2", math.log2(nx), 1),
                # staged_ranges: the nj + 3 searches run in the first warps only (lanes of warps past them skip it)
                (r"for \(int64_t jj = threadIdx.x; jj <= t.nj", math.ceil((tj + 3) / 32) * 32 / nx, 0),
                (r"for \(int e = threadIdx.x; e < total;", K * 2 * ns / nx, 1),
                (r"for \(int cx0 = xa", 1, 1),
                (r"for \(int y0 = ya", batches, 4),
                (r"for \(int c = 0; c < k; \+\+c\)", K, 1),
                (r"e < ch \* nj; e \+= blockDim.x", K * (ns - 1) / nx, 0),
                (r"e < 2 \* ch; e \+= blockDim.x", 2 * K / nx, 0),
                (r"for \(int x = lo; x < hi", cols_per_source, 1),
                (r"for \(int tb = 0; tb < 2", 2, 1),
            ],
        )

    def forward() -> Model:
        return Model(
            threads=pixels,
            outputs=pixels,
            trips=[
                (r"for \(int64_t idx = ", 1, 1),
                (r"for \(int64_t c = 0; c < g.K; \+\+c\)", K, 1),
                (r"for \(int stride = blockDim.x / 2", 8, 1),
            ],
        )

    def backward() -> Model:
        return Model(
            threads=B * h * -(-w // otj) * onx,
            outputs=pixels,
            trips=[
                (r"while \(lo < hi\)", search, 1),
                (r"for \(int64_t cx0 = blk.xa", 1, 1),
                (r"for \(int64_t y = blk.ya", rows_per_group, 1),
                (r"for \(int64_t c = 0; c < g.K; \+\+c\)", K, 1),
                (r"for \(int64_t c = 0; c < C; \+\+c\)", K, 1),
                (r"for \(int64_t c = 0; c < blk.channels", K, 1),
                (r"e < channels \* tj", math.ceil(K * otj / onx), 1),
                (r"jj < blk.nj", 1, 1),
                (r"e < blk.channels \* blk.nj", math.ceil(K * otj / onx), 1),
                (r"for \(int64_t xx = lo", 2 * cols_per_source, 1),
            ],
        )

    def gather() -> Model:  # one thread per low-resolution gradient element
        return Model(threads=B * K * h * w, outputs=pixels, trips=[(r"for \(int64_t idx = ", 1, 1)])

    def final(partials: float) -> Callable[[], Model]:  # one block of 1024 threads
        return lambda: Model(threads=1024, outputs=pixels,
                             trips=[(r"i < n; i \+= blockDim.x", partials / 1024, 1), (r"for \(int stride", 10, 1)])

    def count_valid() -> Model:
        return Model(threads=pixels, outputs=pixels,
                     trips=[(r"for \(int64_t idx = ", 1, 1), (r"for \(int stride = blockDim.x / 2", 8, 1)])

    return {
        "ce_staged_kernel": staged,
        "ce_forward_kernel": forward,
        "ce_backward_kernel": backward,
        "count_valid_kernel": count_valid,
        "staged_gather_kernel": gather,
        "staged_gather_divided_kernel": gather,
        "gather_partials_kernel": gather,
        "reduce_partials_kernel": final(min(pixels // 256, 65536)),  # general path: one partial per forward block
        "sum_counts_kernel": final(tiles * h * B),
    }


# The launches of one loss forward + backward (reduction mean), float32: (file, kernel, template args).
FADA, CE = "fada_loss_kernel.cu", "cross_entropy_kernel.cu"
PATHS = {
    "FADA loss fwd+bwd, general kernels (fallback)": [
        (FADA, "fada_forward_kernel", "float, float"),
        (FADA, "reduce_partials_kernel", "float, float, float"),
        (FADA, "fada_backward_kernel", "float, float"),
        (FADA, "gather_partials_kernel", "float, float"),
    ],
    "FADA loss fwd+bwd, fast path (one fused launch)": [
        (FADA, "fada_staged_kernel", "float, float, true, true"),
        (FADA, "reduce_partials_kernel", "float, float, float"),
        (FADA, "staged_gather_kernel", "float, float"),
    ],
    "CE fwd+bwd, general kernels (fallback)": [
        (CE, "ce_forward_kernel", "float, float"),
        (CE, "count_valid_kernel", ""),
        (CE, "reduce_partials_kernel", "float, float, long"),
        (CE, "count_valid_kernel", ""),
        (CE, "ce_backward_kernel", "float, float"),
        (CE, "gather_partials_kernel", "float, float"),
    ],
    "CE fwd+bwd, fast path (one fused launch)": [
        (CE, "ce_staged_kernel", "float, float, true, true"),
        (CE, "sum_counts_kernel", ""),
        (CE, "reduce_partials_kernel", "float, float, long"),
        (CE, "staged_gather_divided_kernel", "float, float"),
    ],
}


@dataclass
class Cost:
    per_output: float
    unmodelled: List[str]
    loops: List[str] = field(default_factory=list)  # per loop: source, size, unroll, runs, share


def cost_of(fn: Function, model: Model, sources: Dict[str, List[str]]) -> Cost:
    """SASS instructions per output (see the module docstring)."""
    unmodelled: List[str] = []
    iterations: Dict[int, float] = {}
    # a source loop's SASS loops (unrolled body, remainders) share its line and enclosing loop; the same
    # line in another enclosing loop is another inlined copy (e.g. one template per rows-per-pass)
    by_line: Dict[Tuple[str, int, Optional[int]], List[int]] = {}
    for k, lp in enumerate(fn.loops):
        by_line.setdefault((lp.file, lp.line, lp.parent), []).append(k)
    for (file, line, _), ids in by_line.items():
        text = sources.get(file, [""] * (line + 1))[line - 1] if line > 0 else ""
        match = next(((t, s) for rx, t, s in model.trips if re.search(rx, text)), None)
        if match is None:
            unmodelled.append(f"{file}:{line} {text.strip()[:60]}")
            for k in ids:
                iterations[k] = 0.0
            continue
        trips, source_step = match
        # the most unrolled loop on the line first, then its remainders, each taking what is left
        left = float(trips)
        for k in sorted(ids, key=lambda j: -fn.loops[j].step):
            u = max(1, fn.loops[k].step // source_step) if source_step else 1  # 0: a register stride, never unrolled
            u = u if trips > 1 and u <= 16 else 1  # a once-per-thread loop is not unrolled: a pointer's step
            iterations[k] = math.floor(left / u) if u > 1 else left
            left -= iterations[k] * u
            if _peeled(fn, k):  # its first iteration is straight code before it
                iterations[k] = max(0.0, iterations[k] - 1)
    executions: Dict[int, float] = {}

    def body_runs(k: int) -> float:
        if k not in executions:
            parent = fn.loops[k].parent
            executions[k] = iterations[k] * (1.0 if parent is None else body_runs(parent))
        return executions[k]

    per_thread = top_level_count(fn) + sum(lp.exclusive * body_runs(k) for k, lp in enumerate(fn.loops))
    scale = model.threads / model.outputs
    lines = [f"top level: {top_level_count(fn)} instructions, {top_level_count(fn) * scale:,.0f} per output",
             f"called subroutines (slow paths, not counted): {fn.subroutine_instructions} instructions"]
    for k, lp in enumerate(fn.loops):
        lines.append(f"{lp.file}:{lp.line}: {lp.exclusive} instructions (step {lp.step}) x {body_runs(k):.2f} runs "
                     f"per thread = {lp.exclusive * body_runs(k) * scale:,.0f} per output")
    return Cost(per_thread * scale, unmodelled, lines)


# ----------------------------------------------------------------------------- compile, disassemble, report


def _tool(name: str) -> str:
    for site in sys.path:
        for path in glob.glob(os.path.join(site, "nvidia", "*", "bin", name)):
            return path
    found = shutil.which(name)
    if not found:
        sys.exit(f"{name} not found: pip install nvidia-cuda-nvdisasm (the 'bench' extra) or put it on the PATH")
    return found


def compile_cubin(source: str, csrc: str, arch: str, workdir: str) -> Tuple[str, str]:
    """nvcc -cubin of one .cu with the library's flags; returns (cubin path, ptxas -v log)."""
    import torch.utils.cpp_extension as cpp

    from fada_core import _build

    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    includes = [f"-I{p}" for p in cpp.include_paths(device_type="cuda")] + [f"-I{csrc}"]
    includes += _build._cuda_fallback_includes(home)
    cubin = os.path.join(workdir, os.path.basename(source) + ".cubin")
    cmd = [os.path.join(home, "bin", "nvcc"), "-cubin", f"-arch={arch}", "-std=c++20", *cpp.COMMON_NVCC_FLAGS,
           *_build.cuda_cflags(ptxas_verbose=True), "-DTORCH_API_INCLUDE_EXTENSION_H", "-D_GLIBCXX_USE_CXX11_ABI=1",
           *includes, "-o", cubin, source]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"nvcc failed on {source}:\n{run.stderr[-4000:]}")
    return cubin, run.stdout + run.stderr


def demangle(names: List[str]) -> Dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short_name(pretty: str) -> Tuple[str, str]:
    """('fada_staged_kernel', 'float, float, true, true') from a demangled signature."""
    m = re.search(r"(\w+)<(.*?)>\(", pretty)
    if m:
        return m.group(1), re.sub(r"c10::", "", m.group(2))
    m = re.search(r"(\w+)\(", pretty)
    return (m.group(1), "") if m else (pretty, "")


def report(csrc: str, arch: str, keep: Optional[str] = None, show_loops: bool = False) -> str:
    models = {FADA: fada_models(), CE: ce_models()}  # per source file: kernels' trip-count models
    sources = {}
    for path in glob.glob(os.path.join(csrc, "**", "*.cu*"), recursive=True) + glob.glob(
        os.path.join(csrc, "**", "*.h"), recursive=True
    ):
        with open(path) as f:
            sources[os.path.basename(path)] = f.read().splitlines()
    rows, per_kernel = [], {}
    with tempfile.TemporaryDirectory() as work:
        for source in sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu"))):
            cubin, log = compile_cubin(source, csrc, arch, work)
            text = subprocess.run([_tool("nvdisasm"), "-g", "-c", cubin], capture_output=True, text=True).stdout
            if keep:
                os.makedirs(keep, exist_ok=True)
                stem = os.path.join(keep, os.path.basename(source))
                with open(stem + ".sass", "w") as f:
                    f.write(text)
                with open(stem + ".ptxas.log", "w") as f:
                    f.write(log)
            functions = parse_sass(text)
            ptxas = parse_ptxas(log)
            pretty = demangle(list(functions))
            for name, fn in functions.items():
                kernel, targs = short_name(pretty[name])
                regs, st, ld = ptxas.get(name, (-1, -1, -1))
                cost = None
                file_models = models.get(os.path.basename(source), {})
                if kernel in file_models:
                    cost = cost_of(fn, file_models[kernel](), sources)
                    per_kernel[(os.path.basename(source), kernel, targs)] = cost
                rows.append((os.path.basename(source), kernel, targs, regs, st, ld, len(fn.instructions),
                             len(fn.loops), cost))
    lines = [f"SASS for {arch}; per-output figures at B={SHAPE['B']}, K={SHAPE['K']}, "
             f"{SHAPE['h']}x{SHAPE['w']} -> {SHAPE['H']}x{SHAPE['W']} (per output pixel)", ""]
    lines.append("| file | kernel | template args | regs | spill st/ld B | SASS | loops | SASS / output |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for file, kernel, targs, regs, st, ld, n, nl, cost in rows:
        per = "no model" if cost is None else f"{cost.per_output:,.0f}{'+' if cost.unmodelled else ''}"
        lines.append(f"| {file} | {kernel} | {targs} | {regs} | {st}/{ld} | {n} | {nl} | {per} |")
    lines.append("")
    for path, parts in PATHS.items():
        costs = [per_kernel.get(p) for p in parts]
        if all(c is not None for c in costs):
            total = sum(c.per_output for c in costs)
            detail = " + ".join(f"{k} {c.per_output:,.0f}" for (_, k, _), c in zip(parts, costs))
            lines.append(f"{path}: {total:,.0f} SASS instructions per output pixel ({detail})")
    if show_loops:
        for (_, kernel, targs), cost in per_kernel.items():
            lines += ["", f"{kernel}<{targs}>:"] + ["  " + x for x in cost.loops]
    unmodelled = sorted({u for c in per_kernel.values() for u in c.unmodelled})
    if unmodelled:
        lines.append("")
        lines.append("loops without a trip model (left out, figures marked +): " + "; ".join(unmodelled))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csrc", default=os.path.join(ROOT, "fada_core", "csrc"), help="fada_core/csrc to compile")
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--keep", help="save each file's SASS and ptxas log in this folder")
    parser.add_argument("--loops", action="store_true", help="print each modelled kernel's loops and their shares")
    args = parser.parse_args()
    print(report(os.path.abspath(args.csrc), args.arch, args.keep, args.loops))


if __name__ == "__main__":
    main()
