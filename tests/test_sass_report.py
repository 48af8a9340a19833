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


# A loop (back branch on line 30) whose body skips a slow block (line 32) when P0 is set.
SASS_FAST_PATH = """
//--------------------- .text.k2 --------------------------
k2:
	//## File "/src/k.cu", line 29
        /*0000*/                   MOV R2, RZ ;
.L_x_10:
	//## File "/src/k.cu", line 31
        /*0010*/                   LDG.E R4, desc[UR4][R6.64] ;
        /*0020*/                   ISETP.NE.AND P0, PT, R4, RZ, PT ;
        /*0030*/               @P0 BRA `(.L_x_11) ;
	//## File "/src/k.cu", line 32
        /*0040*/                   FADD R5, R5, R4 ;
        /*0050*/                   FMUL R5, R5, R4 ;
        /*0060*/                   FMUL R5, R5, R4 ;
.L_x_11:
	//## File "/src/k.cu", line 30
        /*0070*/                   IADD3 R2, R2, 0x20, RZ ;
        /*0080*/                   ISETP.GE.AND P1, PT, R2, R8, PT ;
        /*0090*/              @!P1 BRA `(.L_x_10) ;
        /*00a0*/                   EXIT ;
.L_x_12:
        /*00b0*/                   BRA `(.L_x_12);
"""

SOURCE_FAST_PATH = {"k.cu": [""] * 29 + ["for (int left = n; left > 0; left -= kLanes) {"]}


def test_fast_path_counts_the_shortest_way_through_the_loop():
    fn = S.parse_sass(SASS_FAST_PATH)["k2"]
    assert [(lp.line, lp.exclusive, lp.step) for lp in fn.loops] == [(30, 9, 32)]
    assert S.shortest_path(fn, 0) == 6  # LDG, ISETP, BRA, IADD3, ISETP, BRA: the FADD/FMUL block skipped
    trips = [(S.STATS_STEP, 10, 32)]
    every = S.cost_of(fn, S.Model(threads=32, outputs=32 * 32 * 10, trips=trips), SOURCE_FAST_PATH)
    fast = S.cost_of(fn, S.Model(threads=32, outputs=32 * 32 * 10, trips=trips, fast_path=(trips[0][0],)),
                     SOURCE_FAST_PATH)
    # per thread: 3 top level (MOV, EXIT, the trap branch) + 10 steps of 9 (every instruction) or 6
    assert every.per_output == pytest.approx((3 + 10 * 9) / (32 * 10))
    assert fast.per_output == pytest.approx((3 + 10 * 6) / (32 * 10))


def test_induction_step_through_another_register():
    """``left -= 32`` compiled as a sum into another register that is moved back."""
    body = [S.Instruction(t, "k.cu", 1) for t in (
        "ISETP.GT.AND P0, PT, R26, 0x20, PT", "VIADD R19, R26, 0xffffffe0", "IADD3 R13, P3, R13, 0x40, RZ",
        "IMAD.MOV.U32 R26, RZ, RZ, R19", "@P0 BRA `(.L_x_54)")]
    assert S._induction_step(body) == 32


def test_fast_path_needs_a_loop_without_nested_loops():
    fn = S.parse_sass(SASS)["k1"]
    with pytest.raises(ValueError, match="nested loops"):
        S.shortest_path(fn, 0)


def test_stats_model_follows_the_kernels_splits():
    assert S.stats_split_length(2, 65 * 129) == 1024  # at least kMinSplit
    assert S.stats_split_length(64, 512 * 1024) == 512 * 1024  # about kMaxSplits splits over the batch
    assert S.stats_split_length(3, 40000) % 32 == 0
    assert S.stats_split_length(1, 1 << 40) == 1 << 30  # kMaxSplit: a split's pixels fit an int
    B, C, hw = 2, 2048, 65 * 129
    m = S.partial_stats_model(f"float, {S.LAYOUT}1")
    # 9 splits per image (8 of 1024 pixels, one of 193): 64 channel groups x 18 splits, one warp each
    assert m.threads == 64 * 18 * 32 and m.outputs == B * hw * C
    (base, steps, step), classes = m.trips
    assert step == 32 and steps == pytest.approx((8 * 32 + 7) / 9) and m.fast_path == (base,)
    assert classes[1] == 19
    vec16 = S.partial_stats_model(f"float, {S.LAYOUT}2")  # costed at 64x128 (h*w % 4 == 0)
    assert vec16.outputs == B * 64 * 128 * C and vec16.trips[0][1] == 32


def test_models_cover_every_kernel_of_each_file_with_its_own_shape():
    models = S.models()
    assert set(models) == {S.FADA, S.CE, S.STATS}
    # the gradient gather reads the loss's logits: 2K discriminator channels for FADA, K for CE
    K, B, h, w = (S.SHAPE[k] for k in ("K", "B", "h", "w"))
    assert models[S.FADA]["staged_gather_kernel"]("float, float").threads == B * 2 * K * h * w
    assert models[S.CE]["staged_gather_kernel"]("float, float").threads == B * K * h * w
    for file, kernels in models.items():
        for kernel, model in kernels.items():
            targs = f"float, {S.LAYOUT}0" if file == S.STATS else "float, float"
            m = model(targs)
            assert m.threads > 0 and m.outputs > 0 and m.trips, (file, kernel)


def test_per_output_figures_keep_tenths_below_100():
    assert S.per(9.66) == "9.7" and S.per(1761.4) == "1,761"


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
