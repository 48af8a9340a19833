"""Static cost of the CUDA kernels: registers, spills and SASS instructions per output, no GPU needed.

Compiles every ``fada_core/csrc/cuda/*.cu`` for one architecture (default sm_90) against torch's
headers with the library's own nvcc flags, disassembles the cubin (``nvdisasm``, with line info)
and prints, per kernel: registers and spill bytes (ptxas), SASS instructions, loops, and, where a
trip-count model below covers the kernel, SASS instructions per output at the benchmark shapes: per
output pixel for the losses at B=4, K=19, 64x128 -> 512x1024; per element (one pixel of one channel)
for the class statistics at B=2, C=2048, K=19, 65x129.

How the per-output figure is derived:

1. Loops are found in the SASS: a branch back to an earlier label closes a loop; loops nest by
   address range. Each instruction counts once, in its innermost loop (or at top level).
2. Each SASS loop is tied to a source loop by the line info of its back branch: that line's text
   is matched against the kernel's model (``models()``), which gives the source loop's trip count
   per execution of its enclosing loop at the benchmark shape (and its source step, e.g. 4 for
   ``y0 += kRows``; 0 for a loop strided by a register, ``e += blockDim.x``, never unrolled). The
   SASS loops of one source line are grouped per enclosing loop (the same line in another enclosing
   loop is another inlined copy). Loops of the out-of-line functions nvcc appends (``$kernel$function``,
   ``$__internal_*``) are not the kernel's; trailing alignment NOPs are dropped.
3. Unrolling: the loop's induction register is found (compared in the loop, directly, as either
   operand for a down-counter, or through one add, and incremented by an immediate, possibly through
   a register moved back into it); increment / source step = unroll factor u (taken as
   1 above 16 or for loops that run at most once per thread: that step is a pointer's). The most unrolled loop on a line runs
   floor(trips / u) times, other loops on the line (remainders) take what is left in turn; a
   peeled remainder is straight code of the enclosing loop and counted with it.
4. Per thread: sum of (instructions in loop x executions of its body); a loop the model marks
   ``fast_path`` counts only the shortest path through its body (the class statistics' 32-pixel step
   without a class change: a figure for the common case, not a bound); top-level code counts once
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
    labels: Dict[str, int] = field(default_factory=dict)  # branch target -> index of its instruction


_FILE_LINE = re.compile(r'\s*//## File "(.*)", line (\d+)')
_LABEL = re.compile(r"^(\.L_x_\d+|\$\S+):")
_INSTR = re.compile(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")
_COMPARE = re.compile(r"\bU?ISETP\S*\s+U?P\w+,\s*U?P\w+,\s*(U?R\w+)(?:,\s*(U?R\w+))?")
_MOVE = re.compile(r"\b(?:IMAD\.MOV\.U32|MOV)\s+(R\d+),\s*(?:RZ,\s*RZ,\s*)?(R\d+)\s*$")
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
        fn.labels = labels
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
        m = _BRANCH.search(ins.text)
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
    # (register, source, immediate) of every add of an immediate; c + immediate may go into another
    # register that is then moved back into c (``left -= 32`` on sm_90)
    adds = [m.group(1, 2, 3) for m in map(_INCREMENT.search, (i.text for i in body)) if m]
    for wanted in (compared, feeds):
        for ins in reversed(body):
            m, moved = _INCREMENT.search(ins.text), _MOVE.search(ins.text)
            if m and m.group(1) == m.group(2) and m.group(1) in wanted:
                return _step(m.group(3))
            if moved and moved.group(1) in wanted:
                into = [imm for reg, src, imm in adds if reg == moved.group(2) and src == moved.group(1)]
                if into:
                    return _step(into[-1])
    return 1


def _step(immediate: str) -> int:
    step = int(immediate, 0)
    step = step - (1 << 32) if step >= 1 << 31 else step  # 32-bit immediates: 0xfffffffc is -4
    return abs(step) if step else 1


_ENDS = re.compile(r"^(?:EXIT|RET)\b")


def _successors(fn: Function, i: int) -> List[int]:
    """Where control can go after instruction i: the next one unless an unpredicated branch, EXIT or
    RET, and a branch's target."""
    text = fn.instructions[i].text
    predicated = text.startswith("@")
    m = _BRANCH.search(text)
    out = [fn.labels[m.group(1)]] if m and m.group(1) in fn.labels else []
    if predicated or (not m and not _ENDS.match(text)):
        out.append(i + 1)
    return [j for j in out if j < len(fn.instructions)]


def shortest_path(fn: Function, k: int) -> int:
    """Instructions on the shortest path through loop k's body, from its first instruction to its
    back branch (both counted), within the loop's address range: the iteration that takes every
    fast path. Only for a loop with no loop nested in it."""
    lp = fn.loops[k]
    if any(o.parent == k for o in fn.loops):
        raise ValueError(f"{fn.name}: the loop at line {lp.line} has nested loops; no shortest path model for it")
    dist = {lp.start: 1}
    frontier = [lp.start]
    while frontier and lp.end not in dist:
        nxt = []
        for i in frontier:
            for j in _successors(fn, i):
                if lp.start <= j <= lp.end and j not in dist:
                    dist[j] = dist[i] + 1
                    nxt.append(j)
        frontier = nxt
    if lp.end not in dist:
        raise ValueError(f"{fn.name}: no path through the loop at line {lp.line}")
    return dist[lp.end]


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
    """Trip counts of one kernel at its benchmark shape: (regex on the loop's source line, trips, step);
    step 0: a loop strided by a register (``e += blockDim.x``), which nvcc does not unroll. A loop whose
    line matches a ``fast_path`` regex counts the shortest path through its body (every fast path
    taken) instead of all its instructions."""

    threads: float
    outputs: float
    trips: List[Tuple[str, float, int]]
    fast_path: Tuple[str, ...] = ()


@dataclass
class LossShape:
    """The benchmark shape as one loss's kernels see it, and the tilings their host code derives."""

    C: int  # logit channels per pixel (FADA: the discriminator's 2K; cross-entropy: K)
    staged_channels: float  # planes per stage_rows call, averaged over the kernel's calls
    B: int = SHAPE["B"]
    K: int = SHAPE["K"]
    h: int = SHAPE["h"]
    w: int = SHAPE["w"]
    H: int = SHAPE["H"]
    W: int = SHAPE["W"]
    staged: Tuple[int, int] = (1, 32)  # (tj, nx) of the staged kernel
    adjoint: Tuple[int, int] = (1, 32)  # (tj, nx) of the general backward

    @property
    def pixels(self) -> int:
        return self.B * self.H * self.W

    @property
    def search(self) -> int:  # binary searches over output indices
        return math.ceil(math.log2(self.W)) + 1

    @property
    def batches(self) -> float:  # cross-entropy: passes of kRows = 4 rows per row group
        i0y = source_i0(self.h, self.H)
        return sum(-(-i0y.count(r) // 4) for r in range(self.h)) / self.h

    @property
    def passes(self) -> Dict[int, float]:  # FADA: passes of 8, then 4, then 1 rows per row group (average)
        groups = [source_i0(self.h, self.H).count(r) for r in range(self.h)]
        return {8: sum(n // 8 for n in groups) / self.h, 4: sum(n % 8 // 4 for n in groups) / self.h,
                1: sum(n % 4 for n in groups) / self.h}

    @property
    def tiles(self) -> int:
        return -(-self.w // self.staged[0])


def loss_shape(C: int, staged_channels: float, smem_of: Callable[[int, int, int], int],
               smem_limit: int = 227 * 1024) -> LossShape:
    s = LossShape(C, staged_channels)
    s.staged = staged_config(s.K, s.w, s.W, smem_of, smem_limit)
    s.adjoint = old_adjoint_config(C, s.w, s.W)
    return s


# The kernels of both losses, as functions of the loss's shape. Lines that only one loss's source
# has match nothing in the other's.
def staged_model(s: LossShape) -> Model:
    tj, nx = s.staged
    ns = tj + 1
    return Model(
        threads=s.B * s.h * s.tiles * nx,
        outputs=s.pixels,
        trips=[
            (r"while \(lo < hi\)", s.search, 1),
            (r"for \(int stride = blockDim.x / 2", math.log2(nx), 1),
            # staged_ranges: the nj + 3 searches run in the first warps only (lanes of warps past them skip it)
            (r"for \(int64_t jj = threadIdx.x; jj <= t.nj", math.ceil((tj + 3) / 32) * 32 / nx, 0),
            (r"for \(int e = threadIdx.x; e < total;", s.staged_channels * 2 * ns / nx, 1),
            (r"for \(int cx0 = xa", 1, 1),
            (r"for \(int c = 0; c < channels; \+\+c", s.staged_channels, 1),  # FADA interpolate_column: 2K, then K
            (r"for \(; y0 \+ 8 <= yb; y0 \+= 8\)", s.passes[8], 8),  # FADA
            (r"for \(; y0 \+ 4 <= yb; y0 \+= 4\)", s.passes[4], 4),  # FADA
            (r"for \(; y0 < yb; \+\+y0\)", s.passes[1], 1),  # FADA
            (r"for \(int y0 = ya", s.batches, 4),  # cross-entropy
            (r"for \(int c = 0; c < 2 \* k; \+\+c, ", s.C, 1),  # FADA
            (r"for \(int c = 0; c < k; \+\+c[,)]", s.K, 1),
            (r"e < ch \* nj; e \+= blockDim.x", s.C * (ns - 1) / nx, 0),  # staged_adjoint, staged_write_slots
            (r"for \(int x = lo; x < hi", s.W / s.w, 1),
            (r"e < 2 \* ch; e \+= blockDim.x", 2 * s.C / nx, 0),  # staged_write_slots: spills
            (r"for \(int tb = 0; tb < 2", 2, 1),
        ],
    )


def forward_model(s: LossShape) -> Model:
    return Model(
        threads=s.pixels,
        outputs=s.pixels,
        trips=[
            (r"for \(int64_t idx = ", 1, 1),
            (r"for \(int64_t c = 0; c < g.K; \+\+c\)", s.K, 1),
            (r"for \(int64_t c = 0; c < 2 \* g.K", 2 * s.K, 1),  # FADA
            (r"for \(int stride = blockDim.x / 2", 8, 1),
        ],
    )


def backward_model(s: LossShape) -> Model:
    tj, nx = s.adjoint
    return Model(
        threads=s.B * s.h * -(-s.w // tj) * nx,
        outputs=s.pixels,
        trips=[
            (r"while \(lo < hi\)", s.search, 1),
            (r"for \(int64_t cx0 = blk.xa", 1, 1),
            (r"for \(int64_t y = blk.ya", s.H / s.h, 1),
            (r"for \(int64_t c = 0; c < g.K; \+\+c\)", s.K, 1),
            (r"for \(int64_t c = 0; c < 2 \* g.K", 2 * s.K, 1),  # FADA
            (r"for \(int64_t c = 0; c < C; \+\+c\)", s.C, 1),
            (r"for \(int64_t c = 0; c < blk.channels", s.C, 1),
            (r"e < channels \* tj", math.ceil(s.C * tj / nx), 1),
            (r"jj < blk.nj", 1, 1),
            (r"e < blk.channels \* blk.nj", math.ceil(s.C * tj / nx), 1),
            (r"for \(int64_t xx = lo", 2 * s.W / s.w, 1),
        ],
    )


def gather_model(s: LossShape) -> Model:  # one thread per low-resolution gradient element
    return Model(threads=s.B * s.C * s.h * s.w, outputs=s.pixels, trips=[(r"for \(int64_t idx = ", 1, 1)])


def count_valid_model(s: LossShape) -> Model:
    return Model(threads=s.pixels, outputs=s.pixels,
                 trips=[(r"for \(int64_t idx = ", 1, 1), (r"for \(int stride = blockDim.x / 2", 8, 1)])


def one_block_model(partials: Callable[[LossShape], float]) -> Callable[[LossShape], Model]:
    """A final sum over `partials(s)` values by one block of 1024 threads."""
    return lambda s: Model(threads=1024, outputs=s.pixels,
                           trips=[(r"i < n; i \+= blockDim.x", partials(s) / 1024, 1), (r"for \(int stride", 10, 1)])


def staged_partials(s: LossShape) -> float:  # one per staged block
    return s.tiles * s.h * s.B


# ---------------------------------------------------------------- class statistics

# The statistics kernel's benchmark shape (issue 11's): B=2, C=2048 channels, K=19 classes, 65x129
# (NCHW with h*w % 4 == 0 takes the 16-byte path, costed at 64x128).
STATS_SHAPE = dict(B=2, C=2048, K=19, h=65, w=129)
STATS_MIN_SPLIT, STATS_MAX_SPLIT, STATS_MAX_SPLITS, LANES = 1024, 1 << 30, 64, 32  # kMinSplit, ..., kLanes


def stats_split_length(batch: int, hw: int) -> int:
    """Pixels of one image per split, as split_length picks them (csrc/cuda/class_stats_kernel.cu)."""
    n = min(max(-(-batch * hw // STATS_MAX_SPLITS), STATS_MIN_SPLIT), STATS_MAX_SPLIT)
    return -(-n // LANES) * LANES


# partial_stats_kernel's layouts as the report names its instantiations' template arguments
LAYOUT = "(fada_core::(anonymous namespace)::Layout)"
STATS_LAYOUTS = {0: "channels_last", 1: "NCHW", 2: "NCHW, h*w % 4 == 0 (16-byte loads; 64x128)"}


STATS_STEP = r"for \(int left = "  # the walk over a split, a 32-pixel step per iteration


def partial_stats_model(targs: str) -> Model:
    """One warp per (32-channel group, split of an image's pixels), stepping 32 pixels at a time;
    per output element (one pixel of one channel). Each step counts the path of a step without a
    class change (the fast path; a change adds a test per pixel and a flush per change)."""
    B, C, K = STATS_SHAPE["B"], STATS_SHAPE["C"], STATS_SHAPE["K"]
    h, w = (64, 128) if targs.endswith(f"{LAYOUT}2") else (STATS_SHAPE["h"], STATS_SHAPE["w"])
    hw = h * w
    split = stats_split_length(B, hw)
    splits = -(-hw // split)
    steps = sum(-(-min(split, hw - p) // LANES) for p in range(0, hw, split)) / splits  # per unit
    units = -(-C // LANES) * B * splits
    return Model(
        threads=units * LANES,
        outputs=B * hw * C,
        trips=[(STATS_STEP, steps, LANES), (r"for \(int k = 0; k < num_classes; \+\+k\)", K, 1)],
        fast_path=(STATS_STEP,),
    )


FADA, CE, STATS = "fada_loss_kernel.cu", "cross_entropy_kernel.cu", "class_stats_kernel.cu"


def models() -> Dict[str, Dict[str, Callable[[str], Model]]]:
    """Per source file, per kernel: its model, given the instantiation's template arguments."""
    K = SHAPE["K"]
    fada = loss_shape(2 * K, 1.5 * K, fada_staged_smem)  # stages the discriminator's 2K and the seg's K planes
    # float32; the block sums' static shared memory (2 x 128 x (4 + 8) bytes) comes off the limit
    ce = loss_shape(K, K, ce_staged_smem, 227 * 1024 - 128 * 12)
    per_loss = {
        FADA: (fada, {
            "fada_staged_kernel": staged_model,
            "fada_forward_kernel": forward_model,
            "fada_backward_kernel": backward_model,
            "staged_gather_kernel": gather_model,
            "gather_partials_kernel": gather_model,
            "reduce_partials_kernel": one_block_model(staged_partials),
        }),
        CE: (ce, {
            "ce_staged_kernel": staged_model,
            "ce_forward_kernel": forward_model,
            "ce_backward_kernel": backward_model,
            "count_valid_kernel": count_valid_model,
            "staged_gather_kernel": gather_model,
            "staged_gather_divided_kernel": gather_model,
            "gather_partials_kernel": gather_model,
            # general path: one partial per forward block
            "reduce_partials_kernel": one_block_model(lambda s: min(s.pixels // 256, 65536)),
            "sum_counts_kernel": one_block_model(staged_partials),
        }),
    }
    out: Dict[str, Dict[str, Callable[[str], Model]]] = {
        file: {kernel: (lambda targs, m=m, s=s: m(s)) for kernel, m in kernels.items()}
        for file, (s, kernels) in per_loss.items()
    }
    out[STATS] = {"partial_stats_kernel": partial_stats_model}
    return out


# The launches of one loss forward + backward (reduction mean), float32: (file, kernel, template args).
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
    size = {k: lp.exclusive for k, lp in enumerate(fn.loops)}  # instructions one iteration runs
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
        if any(re.search(rx, text) for rx in model.fast_path):
            size.update({k: shortest_path(fn, k) for k in ids})
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

    per_thread = top_level_count(fn) + sum(size[k] * body_runs(k) for k in size)
    scale = model.threads / model.outputs
    lines = [f"top level: {top_level_count(fn)} instructions, {per(top_level_count(fn) * scale)} per output",
             f"called subroutines (slow paths, not counted): {fn.subroutine_instructions} instructions"]
    for k, lp in enumerate(fn.loops):
        path = f" (fast path of {lp.exclusive})" if size[k] != lp.exclusive else ""
        lines.append(f"{lp.file}:{lp.line}: {size[k]} instructions{path} (step {lp.step}) x {body_runs(k):.2f} runs "
                     f"per thread = {per(size[k] * body_runs(k) * scale)} per output")
    return Cost(per_thread * scale, unmodelled, lines)


def per(x: float) -> str:
    """A per-output figure: whole instructions, tenths below 100 (per-element kernels)."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


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

    from fada_core import _compile

    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    includes = [f"-I{p}" for p in cpp.include_paths(device_type="cuda")] + [f"-I{csrc}"]
    cubin = os.path.join(workdir, os.path.basename(source) + ".cubin")
    cmd = [os.path.join(home, "bin", "nvcc"), "-cubin", f"-arch={arch}", "-std=c++20", *cpp.COMMON_NVCC_FLAGS,
           *_compile.compile_args(True, ptxas_verbose=True)["nvcc"], "-DTORCH_API_INCLUDE_EXTENSION_H",
           "-D_GLIBCXX_USE_CXX11_ABI=1",
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
    kernel_models = models()
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
                file_models = kernel_models.get(os.path.basename(source), {})
                if kernel in file_models:
                    cost = cost_of(fn, file_models[kernel](targs), sources)
                    per_kernel[(os.path.basename(source), kernel, targs)] = cost
                rows.append((os.path.basename(source), kernel, targs, regs, st, ld, len(fn.instructions),
                             len(fn.loops), cost))
    lines = [f"SASS for {arch}; per-output figures at B={SHAPE['B']}, K={SHAPE['K']}, "
             f"{SHAPE['h']}x{SHAPE['w']} -> {SHAPE['H']}x{SHAPE['W']} (per output pixel; class statistics: per "
             f"element, one pixel of one channel, at B={STATS_SHAPE['B']}, C={STATS_SHAPE['C']}, "
             f"K={STATS_SHAPE['K']}, {STATS_SHAPE['h']}x{STATS_SHAPE['w']})", ""]
    lines.append("| file | kernel | template args | regs | spill st/ld B | SASS | loops | SASS / output |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for file, kernel, targs, regs, st, ld, n, nl, cost in rows:
        figure = "no model" if cost is None else f"{per(cost.per_output)}{'+' if cost.unmodelled else ''}"
        lines.append(f"| {file} | {kernel} | {targs} | {regs} | {st}/{ld} | {n} | {nl} | {figure} |")
    lines.append("")
    for path, parts in PATHS.items():
        costs = [per_kernel.get(p) for p in parts]
        if all(c is not None for c in costs):
            total = sum(c.per_output for c in costs)
            detail = " + ".join(f"{k} {per(c.per_output)}" for (_, k, _), c in zip(parts, costs))
            lines.append(f"{path}: {total:,.0f} SASS instructions per output pixel ({detail})")
    stats = [f"{name} {per(per_kernel[(STATS, 'partial_stats_kernel', f'float, {LAYOUT}{n}')].per_output)}"
             for n, name in STATS_LAYOUTS.items() if (STATS, "partial_stats_kernel", f"float, {LAYOUT}{n}") in per_kernel]
    if stats:
        lines.append("Class statistics, partial_stats_kernel<float>, SASS instructions per element on the step "
                     "without a class change: " + "; ".join(stats))
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
