"""Everything a GPU machine should run, in one go: build, the CUDA tests, the GPU benchmarks.

    python benchmarks/gpu_check.py --out "$OUT"     # on a GPU machine (about 6-8 minutes on an H100/H200)
    python benchmarks/gpu_check.py --dry-run        # print the stages and their commands, run nothing
    python benchmarks/gpu_check.py --smoke          # the same stages at CPU scale (no GPU needed)

Stages, each a subprocess with its own time limit (a stage that runs out is recorded as such
and the next one still runs), all within ``--budget`` seconds:

1. ``build``: ``python -m fada_core.info --build --cuda`` (JIT build of the CPU and CUDA kernels
   for the visible GPU's architecture, with the ptxas register/spill report);
2. ``tests``: ``FADA_CORE_REQUIRE_KERNELS=1 python -m pytest -q -m cuda tests``;
3. ``bench_kernels``: ``benchmarks/run.py`` for the FADA loss, the upsampled cross-entropy and the
   class statistics at the pipeline shapes (B=4, K=19, 64x128 -> 512x1024 among them), kernel vs
   eager (official and careful) vs ``torch.compile``: CUDA events, warm-up, the median of fresh
   random input sets, extra peak memory;
4. ``bench_train_step``: one ResNet-101 adversarial training step (generator + discriminator),
   kernels vs the official eager code, time and peak memory.

Writes ``gpu_check.json`` (device, versions, every stage's command, status, time and output tail,
and the benchmark records) and ``gpu_check.md`` (a summary table and the benchmark tables) to
``--out`` (default ``$OUT`` if set, else ``benchmarks/results/gpu``). ``--smoke`` runs the same
stages on the CPU at tiny sizes so the script itself is tested without a GPU
(tests/test_benchmarks.py); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Stage:
    name: str
    argv: List[str]
    limit_s: float
    env: Dict[str, str] = field(default_factory=dict)
    outputs: Dict[str, str] = field(default_factory=dict)  # kind -> path the stage writes


def stages(out: str, smoke: bool) -> List[Stage]:
    """The stages with their commands; ``smoke``: CPU-sized versions of the same commands."""
    py = sys.executable
    require = {"FADA_CORE_REQUIRE_KERNELS": "1", "HYPOTHESIS_PROFILE": "dev", "PYTHONUNBUFFERED": "1"}
    bench = [py, os.path.join("benchmarks", "run.py")]
    kernels_json = os.path.join(out, "bench_kernels.json")
    train_json = os.path.join(out, "bench_train_step.json")
    if smoke:
        return [
            Stage("build", [py, "-m", "fada_core.info", "--build"], 900, {"PYTHONUNBUFFERED": "1"}),
            Stage("tests", [py, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda_sync_free.py"], 300, require),
            Stage("bench_kernels", bench + ["--tiny", "--device", "cpu", "--threads", "1", "--no-memory",
                                            "--ops", "loss,ce,stats", "--json", kernels_json, "--markdown",
                                            os.devnull, "--plot", os.devnull], 300, {"PYTHONUNBUFFERED": "1"},
                  {"json": kernels_json}),
            Stage("bench_train_step", bench + ["--tiny", "--device", "cpu", "--threads", "1", "--no-memory",
                                               "--ops", "train_step", "--json", train_json, "--markdown",
                                               os.devnull, "--plot", os.devnull], 300, {"PYTHONUNBUFFERED": "1"},
                  {"json": train_json}),
        ]
    cuda_env = {"PYTHONUNBUFFERED": "1", "MAX_JOBS": str(os.cpu_count() or 4)}
    arch = visible_arch()
    if arch:  # only the visible GPU's architecture: half the build time of the default two
        cuda_env["TORCH_CUDA_ARCH_LIST"] = arch
    return [
        Stage("build", [py, "-m", "fada_core.info", "--build", "--cuda"], 240, cuda_env),
        Stage("tests", [py, "-m", "pytest", "-q", "-m", "cuda", "tests"], 120, require),
        Stage("bench_kernels", bench + ["--device", "cuda", "--ops", "loss,ce,stats", "--shapes", "pipeline,stats",
                                        "--repeats", "20", "--warmup", "3", "--case-budget", "8",
                                        "--json", kernels_json, "--markdown", os.devnull, "--plot", os.devnull],
              150, {"PYTHONUNBUFFERED": "1"}, {"json": kernels_json}),
        Stage("bench_train_step", bench + ["--device", "cuda", "--ops", "train_step", "--shapes", "e2e",
                                           "--repeats", "5", "--warmup", "2", "--e2e-backbone", "resnet101",
                                           "--json", train_json, "--markdown", os.devnull, "--plot", os.devnull],
              90, {"PYTHONUNBUFFERED": "1"}, {"json": train_json}),
    ]


def visible_arch() -> Optional[str]:
    """``major.minor`` of GPU 0, or None without one."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return f"{major}.{minor}"
    except Exception:
        pass
    return None


def device_description() -> Dict[str, object]:
    """What ran it: GPU name, driver and torch versions (CPU model in smoke mode)."""
    info: Dict[str, object] = {"python": platform.python_version(), "machine": platform.machine()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["device"] = torch.cuda.get_device_name(0)
            info["capability"] = f"{props.major}.{props.minor}"
            info["multiprocessors"] = props.multi_processor_count
            info["memory_gib"] = round(props.total_memory / 2**30, 1)
        else:
            info["device"] = f"CPU ({platform.processor() or platform.machine()}), no CUDA device"
    except Exception as exc:  # torch missing or broken: the stages will say more
        info["device"] = f"unknown ({exc})"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if smi.returncode == 0:
            info["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def run_stage(stage: Stage, limit_s: float, log_dir: str) -> Dict[str, object]:
    """Runs one stage (output teed to log_dir/<name>.log); never raises."""
    env = dict(os.environ, **stage.env)
    # one JIT cache for all stages (the tests and benchmarks load what the build stage built),
    # never one a checkout brought along
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(tempfile.gettempdir(), "fada_core_gpu_check"))
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log_path = os.path.join(log_dir, f"{stage.name}.log")
    print(f"=== {stage.name} (limit {limit_s:.0f} s): {shlex.join(stage.argv)}", flush=True)
    started = time.time()
    status, rc = "ok", None
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(stage.argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=max(limit_s, 1.0))
            rc = proc.returncode
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            status = "timeout"
        except OSError as exc:
            status = "failed"
            log.write(f"could not start: {exc}\n")
    with open(log_path) as log:
        text = log.read()
    record = {"name": stage.name, "command": shlex.join(stage.argv), "env": stage.env, "status": status,
              "returncode": rc, "seconds": round(time.time() - started, 1), "limit_s": round(limit_s),
              "tail": text[-4000:]}
    for kind, path in stage.outputs.items():
        if os.path.isfile(path):
            with open(path) as f:
                record[kind] = json.load(f)
    print(f"--- {stage.name}: {status} in {record['seconds']} s", flush=True)
    print(text[-1500:], flush=True)
    return record


def summary_markdown(result: Dict) -> str:
    """A stage table, then the benchmark tables (benchmarks/report.py) of the stages that wrote JSON."""
    dev = result["device"]
    lines = [f"# gpu_check on {dev.get('device')}", "",
             f"torch {dev.get('torch')} (CUDA {dev.get('torch_cuda')}), {dev.get('nvidia_smi', '')}; "
             f"{'smoke run (CPU, tiny sizes: the figures mean nothing)' if result['smoke'] else 'GPU run'}; "
             f"total {result['seconds']} s", "",
             "| stage | status | seconds | limit |", "|---|---|---|---|"]
    for s in result["stages"]:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {s['limit_s']} |")
    try:
        sys.path.insert(0, ROOT)
        from benchmarks import report

        for s in result["stages"]:
            if "json" in s:
                lines += ["", f"## {s['name']}", "", report.markdown(s["json"])]
    except Exception as exc:  # the summary still says what ran
        lines += ["", f"(benchmark tables unavailable: {exc})"]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results", "gpu"))
    p.add_argument("--budget", type=float, default=470.0, help="seconds for all stages together (default 470)")
    p.add_argument("--only", default="", help="comma list of stage names to run (default: all)")
    p.add_argument("--smoke", action="store_true", help="CPU-sized stages (tests the script without a GPU)")
    p.add_argument("--dry-run", action="store_true", help="print the stages and exit")
    args = p.parse_args(argv)

    out = os.path.abspath(args.out)
    plan = stages(out, args.smoke)
    if args.only:
        keep = {n.strip() for n in args.only.split(",") if n.strip()}
        unknown = keep - {s.name for s in plan}
        if unknown:
            p.error(f"unknown stage(s) {sorted(unknown)}; choose from {[s.name for s in plan]}")
        plan = [s for s in plan if s.name in keep]
    if args.dry_run:
        for s in plan:
            env = " ".join(f"{k}={v}" for k, v in s.env.items())
            print(f"{s.name} (limit {s.limit_s:.0f} s): {env} {shlex.join(s.argv)}")
        return {"plan": [asdict(s) for s in plan], "out": out}

    os.makedirs(out, exist_ok=True)
    started = time.time()
    result: Dict = {"device": device_description(), "smoke": args.smoke, "budget_s": args.budget, "stages": []}
    print(f"gpu_check on {result['device'].get('device')}, budget {args.budget:.0f} s, results in {out}", flush=True)
    for stage in plan:
        left = args.budget - (time.time() - started)
        if left < 5:
            result["stages"].append({"name": stage.name, "command": shlex.join(stage.argv), "status": "skipped",
                                     "returncode": None, "seconds": 0.0, "limit_s": 0, "tail": "budget spent"})
            continue
        result["stages"].append(run_stage(stage, min(stage.limit_s, left), out))
    result["seconds"] = round(time.time() - started, 1)
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    text = summary_markdown(result)
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write(text)
    print(text)
    return result


if __name__ == "__main__":
    outcome = main()
    sys.exit(0 if all(s["status"] == "ok" for s in outcome.get("stages", [])) else 1)
