"""fada_core benchmarks: kernel vs eager vs torch.compile vs the official FADA code path.

Examples::

    python benchmarks/run.py --quick                      # everything, small set, a few minutes
    python benchmarks/run.py --device cpu --threads 2     # the full CPU set
    python benchmarks/run.py --device cuda --ops loss,ce --repeats 50
    python benchmarks/run.py --ops loss --shapes 1x19x65x129-512x1024 --variants fada_kernel
    python benchmarks/run.py --dry-run                    # list what would run

Writes a markdown table, JSON (device, versions, every sample summary) and a PNG of speedup
against resolution to benchmarks/results/ unless other paths are given. See RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Dict, List

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

from benchmarks import measure, report  # noqa: E402
from benchmarks import variants as V  # noqa: E402

RESULTS_DIR = os.path.join(_ROOT, "benchmarks", "results")


def tiny_cases(op: str) -> List[V.Case]:
    """Seconds-long shapes for smoke tests (not for figures)."""
    if op == "loss" or op == "ce":
        return [V.Case(op, 2, 3, 4, 5, 9, 11, "tiny")]
    if op == "stats":
        return [V.Case(op, 2, 3, 4, 5, 4, 5, "tiny", channels=8)]
    return [V.Case(op, 1, 3, 2, 2, 16, 16, "tiny", src_h=24, src_w=16, backbone="small")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--ops", default=",".join(V.OPS), help=f"comma list from {','.join(V.OPS)}")
    p.add_argument("--variants", default="", help="comma list of variant names to keep (the baseline always runs)")
    p.add_argument(
        "--shapes",
        default=",".join(V.GROUPS),
        help=f"comma list of groups ({','.join(V.GROUPS)}) and/or explicit shapes "
        "BxKxhxw-HxW (loss, ce) or BxCxhxw (stats)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed calls per variant and mode (default 10, quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 2, quick 1)")
    p.add_argument("--quick", action="store_true", help="the essential shapes only, few repeats")
    p.add_argument("--case-budget", type=float, default=None, metavar="S",
                   help="stop a case's timing rounds after S seconds once 3 are done (default: none; quick 20)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, 1 repeat, no torch.compile: a smoke run")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 2 on the CPU)")
    p.add_argument("--e2e-batch", type=int, default=None, help="train_step images per domain (default 1)")
    p.add_argument("--e2e-backbone", choices=("resnet101", "vgg16", "small"), default=None,
                   help="train_step backbone (default resnet101 on cuda, small on cpu)")
    p.add_argument("--cpu-time", action="store_true",
                   help="CPU: time the calling thread's CPU time instead of wall time (needs --threads 1): "
                        "what a busy machine's waits for a core leave out")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--compile-all", action="store_true",
                   help="torch.compile every shape (default: pipeline shapes only, B=1 on the CPU; each "
                        "compilation takes tens of seconds)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--no-cpu-isas", action="store_true",
                   help="time only the CPU kernel build picked at load time, not every build this CPU runs")
    p.add_argument("--json", nargs="?", const="", default=None, metavar="PATH", help="write JSON")
    p.add_argument("--markdown", nargs="?", const="", default=None, metavar="PATH", help="write markdown")
    p.add_argument("--plot", nargs="?", const="", default=None, metavar="PATH", help="write the speedup PNG")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--_memory-worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    if args.threads is None and args.device == "cpu":
        args.threads = 2
    if args.cpu_time and (args.device != "cpu" or args.threads != 1):
        p.error("--cpu-time measures one thread's CPU time: it needs --device cpu --threads 1")
    if args.repeats is None:
        args.repeats = 1 if args.tiny else 3 if args.quick else 10
    if args.case_budget is None:
        args.case_budget = 20.0 if args.quick else 0.0
    if args.warmup is None:
        args.warmup = 1 if (args.quick or args.tiny) else 2
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    for op in args.ops:
        if op not in V.OPS:
            p.error(f"unknown op {op!r}; choose from {','.join(V.OPS)}")
    if args.tiny:
        args.no_compile = True
    return args


def plan(args) -> Dict[str, List[V.Case]]:
    tokens = [t.strip() for t in args.shapes.split(",") if t.strip()]
    groups = [t for t in tokens if t in V.GROUPS]
    explicit = [t for t in tokens if t not in V.GROUPS]
    out: Dict[str, List[V.Case]] = {}
    for op in args.ops:
        if args.tiny:
            out[op] = tiny_cases(op)
            continue
        cases = V.default_cases(op, groups, args.quick, args.device)
        if op in ("loss", "ce", "stats"):
            for t in explicit:
                if ("-" in t) == (op != "stats"):
                    cases.append(V.parse_shape(op, t))
        if op == "train_step" and (args.e2e_batch or args.e2e_backbone):
            cases = [dataclasses.replace(c, batch=args.e2e_batch or c.batch, backbone=args.e2e_backbone or c.backbone)
                     for c in cases]
        out[op] = V.dedupe(cases)
    return out


def op_variants(op: str, args) -> List[V.Variant]:
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    vs = V.variants_for(op, names or None)
    if args.device != "cpu" or args.no_cpu_isas:
        vs = [v for v in vs if v.cpu_isa is None]
    if args.no_compile:
        vs = [v for v in vs if not v.compiled]
    return vs


def case_variants(case: V.Case, vs: List[V.Variant], args) -> List[V.Variant]:
    """Drop torch.compile where compiling would cost more than the figure is worth (see --compile-all)."""
    if args.compile_all or case.group in ("custom", "tiny"):
        return vs
    keep = case.group == "pipeline" and (case.batch == 1 or args.device == "cuda")
    return [v for v in vs if keep or not v.compiled]


def main(argv=None) -> Dict:
    args = parse_args(argv)
    if args._memory_worker:
        measure.memory_worker(*args._memory_worker)
        return {}
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        measure.CPU_CLOCK = time.thread_time
    cases = plan(args)
    if args.dry_run:
        for op, cs in cases.items():
            names = ", ".join(v.name for v in op_variants(op, args))
            print(f"{op}: variants {names}")
            for c in cs:
                print(f"  [{c.group}] {c.name}")
        return {"plan": {op: [c.as_dict() for c in cs] for op, cs in cases.items()}}

    started = time.time()
    env = measure.environment(args.device, args.threads or torch.get_num_threads())
    kernels = env["kernels"].get("per_op", env["kernels"].get("failure"))
    print(f"device {args.device} ({env.get('gpu') or env['cpu']}), torch {env['torch']}, threads {env['threads']}, "
          f"kernels: {kernels}, load {env['loadavg_start']}", flush=True)
    result = {
        "command": "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": env,
        "settings": {"repeats": args.repeats, "warmup": args.warmup, "case_budget_s": args.case_budget,
                     "quick": args.quick, "tiny": args.tiny, "threads": args.threads, "cpu_time": args.cpu_time,
                     "temperature": V.TEMPERATURE, "cap": V.CAP, "domain": V.DOMAIN},
        "ops": [],
        "records": [],
    }
    records: List[Dict] = result["records"]
    env["loadavg_per_op"] = {}
    for op, cs in cases.items():
        vs = op_variants(op, args)
        env["loadavg_per_op"][op] = measure.loadavg()
        result["ops"].append(op)
        for c in cs:
            print(f"[{op}] {c.name}", flush=True)
            records += measure.measure_case(c, case_variants(c, vs, args), args.device, args.repeats, args.warmup,
                                            log=lambda s: print(s, flush=True), budget_s=args.case_budget)
        if args.device == "cpu" and not args.no_memory:
            add_cpu_memory(op, records, args)
        # Written after every op, so that an interrupted run keeps what it measured.
        written = write_outputs(result, args, started, final=False)
    written = write_outputs(result, args, started, final=True)
    print()
    print(report.markdown(result))
    for kind, path in written.items():
        print(f"wrote {kind}: {os.path.relpath(path)}")
    result["written"] = written
    return result


def add_cpu_memory(op: str, records: List[Dict], args) -> None:
    # (the pinned instruction-set builds allocate what fada_kernel does: not measured again)
    jobs = [{"case": r["case"], "variant": r["variant"]} for r in records
            if r["op"] == op and "time" in r and not r["variant"].startswith("fada_kernel_")]
    if not jobs:
        return
    print(f"[{op}] peak memory (worker process, {len(jobs)} measurements)", flush=True)
    found = {(json.dumps(m["case"], sort_keys=True), m["variant"]): m
             for m in measure.cpu_memory(jobs, args.threads or 1, os.path.join(RESULTS_DIR, ".work"))}
    for r in records:
        m = found.get((json.dumps(r["case"], sort_keys=True), r["variant"]))
        if m is not None:
            if "extra_peak_mb" in m:
                r["extra_peak_mb"] = m["extra_peak_mb"]
            else:
                r["memory_error"] = m.get("error")


def write_outputs(result: Dict, args, started: float, final: bool) -> Dict[str, str]:
    """JSON, markdown and plot at the requested (or default) paths; returns what was written."""
    env = result["environment"]
    env["loadavg_end"] = measure.loadavg()
    env["busy_processes_end"] = measure.busy_processes()
    env["wall_s"] = round(time.time() - started, 1)
    env["complete"] = final
    report.add_speedups(result["records"])
    outputs = {"json": args.json, "markdown": args.markdown, "plot": args.plot}
    if all(v is None for v in outputs.values()):
        outputs = {k: "" for k in outputs}  # nothing asked for: write all three at the defaults
    stem = f"{'tiny_' if args.tiny else 'quick_' if args.quick else ''}{args.device}"
    defaults = {"json": f"results_{stem}.json", "markdown": f"results_{stem}.md", "plot": f"speedup_{stem}.png"}
    written = {}
    for kind, path in outputs.items():
        if path is None or (kind == "plot" and not final):
            continue
        path = path or os.path.join(RESULTS_DIR, defaults[kind])
        if path == os.devnull:
            continue
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if kind == "json":
            with open(path, "w") as f:
                json.dump(result, f, indent=1, default=str)
        elif kind == "markdown":
            with open(path, "w") as f:
                f.write(report.markdown(result))
        elif report.plot(result, path) is None:
            print("plot skipped (matplotlib missing or no loss/ce data)")
            continue
        written[kind] = path
    return written

if __name__ == "__main__":
    main()
