"""The static cost report's SASS and ptxas parsing and its trip-count arithmetic, on canned text.

The full report (nvcc + nvdisasm) is not run here: ``python benchmarks/sass_report.py``.
"""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import sass_report as S  # noqa: E402

# A kernel with an outer loop (line 10) holding a 2x-unrolled inner loop (line 12) and its
# remainder (also line 12), then the usual trap loop.
SASS = """
//--------------------- .text.k1 --------------------------
k1:
	//## File "/src/k.cu", line 9
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   MOV R2, RZ ;
.L_x_1:
	//## File "/src/k.cu", line 10
        /*0020*/                   MOV R4, RZ ;
.L_x_2:
	//## File "/src/k.cu", line 12
        /*0030*/                   FADD R5, R5, R6 ;
        /*0040*/                   FADD R5, R5, R7 ;
        /*0050*/                   IADD3 R4, R4, 0x2, RZ ;
        /*0060*/                   ISETP.GE.AND P0, PT, R4, R8, PT ;
        /*0070*/               @!P0 BRA `(.L_x_2) ;
.L_x_3:
        /*0080*/                   FADD R5, R5, R6 ;
        /*0090*/                   IADD3 R4, R4, 0x1, RZ ;
        /*00a0*/                   ISETP.GE.AND P0, PT, R4, R9, PT ;
        /*00b0*/               @!P0 BRA `(.L_x_3) ;
	//## File "/src/k.cu", line 10
        /*00c0*/                   IADD3 R2, R2, 0x1, RZ ;
        /*00d0*/                   ISETP.GE.AND P1, PT, R2, R10, PT ;
        /*00e0*/               @!P1 BRA `(.L_x_1) ;
        /*00f0*/                   EXIT ;
.L_x_4:
        /*0100*/                   BRA `(.L_x_4);
"""

PTXAS = """
ptxas info    : Compiling entry function 'k1' for 'sm_90'
ptxas info    : Function properties for k1
    8 bytes stack frame, 4 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 392 bytes cmem[0]
"""

SOURCE = {"k.cu": ["", "", "", "", "", "", "", "", "", "for (int y = 0; y < n; ++y) {", "",
                   "  for (int c = 0; c < K; ++c) s += v[c];"]}


def test_loops_nesting_and_unroll():
    fn = S.parse_sass(SASS)["k1"]
    assert len(fn.instructions) == 17
    lines = [(lp.line, lp.end - lp.start + 1, lp.step) for lp in fn.loops]
    assert lines == [(10, 13, 1), (12, 5, 2), (12, 4, 1)]  # the trap loop is not a loop
    outer = 0
    assert fn.loops[1].parent == outer and fn.loops[2].parent == outer and fn.loops[0].parent is None
    assert fn.loops[0].exclusive == 4  # MOV, IADD3, ISETP, BRA
    assert S.top_level_count(fn) == 4  # MOV, MOV, EXIT, the trap branch


def test_ptxas_registers_and_spills():
    assert S.parse_ptxas(PTXAS) == {"k1": (40, 4, 8)}


def test_cost_uses_trip_counts_and_remainders():
    fn = S.parse_sass(SASS)["k1"]
    model = S.Model(threads=64, outputs=128, trips=[(r"for \(int y", 3, 1), (r"for \(int c", 5, 1)])
    cost = S.cost_of(fn, model, SOURCE)
    # per thread: 4 top level + 3 x (4 outer + 2 x 5 unrolled + 1 x 4 remainder) = 58
    assert cost.unmodelled == []
    assert cost.per_output == pytest.approx(58 * 64 / 128)
    partial = S.cost_of(fn, S.Model(threads=1, outputs=1, trips=[(r"for \(int y", 3, 1)]), SOURCE)
    assert partial.unmodelled and partial.per_output == pytest.approx(4 + 3 * 4)


def test_source_index_matches_the_kernels_float32_arithmetic():
    i0 = S.source_i0(64, 512)
    assert i0[0] == 0 and i0[-1] == 63 and all(b - a in (0, 1) for a, b in zip(i0, i0[1:]))
    tj, nx = S.staged_config(19, 128, 1024)
    assert nx in (32, 64, 128) and 1 <= tj <= 32


# A 2x-unrolled loop counted down to zero (compared as RZ, counter), a called out-of-line function
# with a loop of its own (a rarely taken path: not the kernel's), the trap loop and alignment NOPs.
SASS_CALL = """
//--------------------- .text.k2 --------------------------
k2:
	//## File "/src/k.cu", line 12
        /*0000*/                   MOV R4, R8 ;
.L_x_5:
        /*0010*/                   FADD R5, R5, R6 ;
        /*0020*/                   FADD R5, R5, R7 ;
        /*0030*/                   UIADD3 UR4, UR4, -0x2, URZ ;
        /*0040*/                   ISETP.NE.AND P0, PT, RZ, UR4, PT ;
        /*0050*/               @P0 BRA `(.L_x_5) ;
        /*0060*/                   CALL.REL.NOINC `($k2$slow) ;
        /*0070*/                   EXIT ;
.L_x_6:
        /*0080*/                   BRA `(.L_x_6);
$k2$slow:
.L_x_7:
        /*0090*/                   FADD R5, R5, R6 ;
        /*00a0*/               @P0 BRA `(.L_x_7) ;
        /*00b0*/                   RET.REL.NODEC R20 `(k2) ;
        /*00c0*/                   NOP;
        /*00d0*/                   NOP;
"""


def test_down_counter_called_function_and_padding():
    fn = S.parse_sass(SASS_CALL)["k2"]
    assert len(fn.instructions) == 12  # the NOPs after the end are dropped
    assert fn.subroutine_instructions == 3
    assert [(lp.line, lp.step) for lp in fn.loops] == [(12, 2)]  # the called function's loop is not counted
    assert S.top_level_count(fn) == 4  # MOV, CALL, EXIT, the trap branch
    cost = S.cost_of(fn, S.Model(threads=1, outputs=1, trips=[(r"for \(int c", 6, 1)]), SOURCE)
    assert cost.per_output == pytest.approx(4 + 3 * 5)
    # step 0: a loop strided by a register, taken as not unrolled whatever immediate it adds
    strided = S.cost_of(fn, S.Model(threads=1, outputs=1, trips=[(r"for \(int c", 6, 0)]), SOURCE)
    assert strided.per_output == pytest.approx(4 + 6 * 5)
