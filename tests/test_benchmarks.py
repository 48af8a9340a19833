"""Smoke tests of the benchmark harness (benchmarks/run.py) at tiny sizes.

They check that every stage runs and produces well-formed, correct-looking records (errors
against float64 small, bits repeatable, memory measured); they never assert timings.
"""

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import compare_builds, measure, report  # noqa: E402
from benchmarks import run as bench  # noqa: E402
from benchmarks import variants as V  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _rec(result, op, variant):
    return next(r for r in result["records"] if r["op"] == op and r["variant"] == variant)


def test_cpu_time_clock_needs_one_thread(tmp_path, monkeypatch):
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--threads", "2", "--cpu-time"])
    monkeypatch.setattr(measure, "CPU_CLOCK", measure.CPU_CLOCK)  # restored after the test
    md = str(tmp_path / "r.md")
    result = bench.main(["--tiny", "--ops", "ce", "--variants", "official", "--no-memory", "--repeats", "2",
                         "--threads", "1", "--cpu-time", "--json", os.devnull, "--markdown", md])
    assert measure.CPU_CLOCK is time.thread_time and result["settings"]["cpu_time"] is True
    assert _rec(result, "ce", "official")["time"]["fwdbwd"]["median_ms"] > 0
    with open(md) as f:
        assert "CPU time of the one timing thread" in f.read()


def test_tiny_run_writes_consistent_outputs(tmp_path):
    out = {k: str(tmp_path / f"r.{k}") for k in ("json", "md", "png")}
    result = bench.main(
        ["--tiny", "--ops", "loss,ce,stats", "--no-memory", "--repeats", "2", "--threads", "1",
         "--json", out["json"], "--markdown", out["md"], "--plot", out["png"]]
    )
    with open(out["json"]) as f:
        saved = json.load(f)
    env = saved["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["threads"] == 1
    assert "kernels" in env and "available_on_device" in env["kernels"]
    names = {(r["op"], r["variant"]) for r in saved["records"]}
    assert {("loss", "official"), ("loss", "careful"), ("loss", "fada_eager"), ("ce", "official"),
            ("ce", "fada_eager"), ("stats", "index_add"), ("stats", "onehot_mm"), ("stats", "read_floor"),
            ("stats", "fada_eager")} <= names
    assert not any(v == "compile" for _, v in names)  # --tiny skips torch.compile
    for op, variant in [("loss", "official"), ("loss", "careful"), ("loss", "fada_eager"),
                        ("ce", "official"), ("ce", "fada_eager")]:
        r = _rec(result, op, variant)
        assert r["status"] == "ok", r["status"]
        for mode in ("fwd", "fwdbwd"):
            t = r["time"][mode]
            assert t["n"] == 2 and 0 < t["q1_ms"] <= t["median_ms"] <= t["q3_ms"]
        assert r["errors"]["value_abs"] < 1e-5 and r["errors"]["grad_rel"] < 1e-4
        assert r["bitwise_repeatable"] is True
        assert r["speedup"]["fwdbwd"]["vs_official"] > 0
    assert _rec(result, "loss", "official")["speedup"]["fwd"]["vs_official"] == pytest.approx(1.0)
    for variant in ("index_add", "onehot_mm", "fada_eager"):
        e = _rec(result, "stats", variant)["errors"]
        assert e["counts_abs"] == 0 and e["means_abs"] < 1e-5 and e["m2_rel"] < 1e-4
    assert _rec(result, "stats", "read_floor")["speedup"]["fwd"]["x_read_floor"] == pytest.approx(1.0)
    for op in ("loss", "ce", "stats"):
        kernel = _rec(result, op, "fada_kernel")
        assert kernel["status"] == "ok" or kernel["status"].startswith("unavailable ("), kernel["status"]
        if kernel["status"] == "ok":  # the kernels are built here: they must be right and repeatable
            assert kernel["bitwise_repeatable"] is True
            e = kernel["errors"]
            assert (e["value_abs"] < 1e-5 and e["grad_rel"] < 1e-4) if op != "stats" else e["m2_rel"] < 1e-4
    md = open(out["md"]).read()
    assert "| **B=2 K=3 4x5->9x11** |" in md and "## Targets of issue 3" in md
    assert md.count("| | fada_core eager |") == 3 and "## Targets of issue 3" in md
    assert open(out["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_memory_worker_sees_full_resolution_temporaries(tmp_path):
    # official path at 19 x 2 channels, 256x512: several 38 x 256 x 512 float32 tensors (20 MB each)
    case = V.Case("loss", 1, 19, 8, 16, 256, 512)
    jobs = [{"case": case.as_dict(), "variant": v} for v in ("official", "careful")]
    recs = {r["variant"]: r for r in measure.cpu_memory(jobs, 1, str(tmp_path))}
    assert recs["official"]["extra_peak_mb"] > 60, recs
    assert 20 < recs["careful"]["extra_peak_mb"] < recs["official"]["extra_peak_mb"], recs


def test_errors_catch_a_wrong_variant():
    case = V.Case("loss", 1, 3, 3, 4, 7, 9)
    x = V.make_inputs(case, "cpu", seed=0)
    ref = V.reference(case, x)
    wrong = V.official_loss(x["disc"], x["seg"], (7, 9), domain="target")  # wrong half
    wrong.backward()
    e = V.errors(case, wrong, x["disc"].grad, ref)
    assert e["value_abs"] > 1e-3 and e["grad_rel"] > 1e-2


def test_train_step_tiny_runs():
    result = bench.main(["--tiny", "--ops", "train_step", "--no-memory", "--threads", "1", "--json", os.devnull,
                         "--markdown", os.devnull])
    off = _rec(result, "train_step", "official")
    eager = _rec(result, "train_step", "fada_eager")
    assert off["status"] == "ok" and eager["status"] == "ok", (off["status"], eager["status"])
    assert off["time"]["step"]["median_ms"] > 0 and eager["speedup"]["step"]["vs_official"] > 0


def test_cli_dry_run_lists_the_issue_shapes():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--dry-run"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for text in ("B=4 K=19 64x128->512x1024", "B=1 K=19 65x129->512x1024", "B=1 K=19 90x160->720x1280",
                 "B=2 C=2048 65x129 (N=16770)", "N=102400", "K=38", "fada_kernel", "compile"):
        assert text in proc.stdout


def test_parse_shape_and_summary():
    c = V.parse_shape("loss", "4x19x64x128-512x1024")
    assert (c.batch, c.classes, c.h, c.w, c.H, c.W) == (4, 19, 64, 128, 512, 1024)
    assert V.parse_shape("stats", "2x2048x65x129").channels == 2048
    with pytest.raises(ValueError):
        V.parse_shape("loss", "4x19x64x128")
    s = measure.summarize([0.004, 0.001, 0.002, 0.003, 0.1])
    assert s["median_ms"] == pytest.approx(3.0) and s["n"] == 5 and s["min_ms"] == pytest.approx(1.0)
    assert s["iqr_ms"] == pytest.approx(2.0)
    assert math.isclose(report.ratio(10.0, 2.0), 5.0) and report.ratio(1.0, None) is None


def test_gpu_check_plan_names_every_stage():
    """benchmarks/gpu_check.py: build, the CUDA tests with the kernels required, both benchmark stages,
    within the 8-minute budget; --smoke plans the same stages at CPU scale."""
    from benchmarks import gpu_check

    plan = gpu_check.main(["--dry-run", "--out", "/nonexistent/out"])["plan"]
    by_name = {s["name"]: s for s in plan}
    assert list(by_name) == ["build", "tests", "bench_kernels", "bench_train_step"]
    assert "--build" in by_name["build"]["argv"] and "--cuda" in by_name["build"]["argv"]
    assert by_name["tests"]["env"]["FADA_CORE_REQUIRE_KERNELS"] == "1"
    assert by_name["tests"]["argv"][-3:] == ["-m", "cuda", "tests"]
    assert "loss,ce,stats" in by_name["bench_kernels"]["argv"] and "cuda" in by_name["bench_kernels"]["argv"]
    assert "resnet101" in by_name["bench_train_step"]["argv"]
    assert all(s["outputs"].get("json", "").startswith("/nonexistent/out") for s in plan if s["name"].startswith("bench"))
    smoke = gpu_check.main(["--dry-run", "--smoke"])["plan"]
    assert [s["name"] for s in smoke] == list(by_name) and all("cuda" not in s["argv"][-12:] for s in smoke[2:])


def test_gpu_check_smoke_writes_json_and_markdown(tmp_path):
    """One real stage of the smoke mode: the stage runs as a subprocess and the summary names the device."""
    from benchmarks import gpu_check

    result = gpu_check.main(["--smoke", "--only", "tests", "--out", str(tmp_path), "--budget", "300"])
    (stage,) = result["stages"]
    assert stage["status"] == "ok", stage["tail"]
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["device"]["device"] == result["device"]["device"] and saved["smoke"] is True
    text = (tmp_path / "gpu_check.md").read_text()
    assert text.startswith(f"# gpu_check on {saved['device']['device']}") and "| tests | ok |" in text
    assert (tmp_path / "tests.log").read_text().strip()


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64", reason="x86-64 ELF libraries")
def test_compare_builds_on_the_loaded_library(kernel_ops, tmp_path):
    from fada_core import _build

    library = _build.status()["library"]
    functions = compare_builds.kernel_functions(library)
    for isa in ("default", "avx2", "avx512"):  # every instruction-set build is in the library
        assert any(f"fada_cpu_{isa}::" in name for name in functions), isa
    assert compare_builds.main([library, library]) == 0
    # moved code (other addresses, jump targets) is the same code; another instruction is not
    assert compare_builds._normalise("jmp    2d013 <f(int)+0x1403>") == compare_builds._normalise("jmp 11aac <f(int)+0x10>")
    assert compare_builds._normalise("vaddpd %ymm1,%ymm2,%ymm3") != compare_builds._normalise("vsubpd %ymm1,%ymm2,%ymm3")
