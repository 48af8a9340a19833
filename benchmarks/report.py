"""Turn the measurement records into a markdown report, the issue-3 target check and a plot.

Speedups are ratios of medians measured in the same run, same case, same mode.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence

OP_TITLES = {
    "loss": "FADA soft-label loss (discriminator logits 2K channels, soft labels from K seg logits)",
    "ce": "Upsampled segmentation cross-entropy (T = 1.8, ignore 255)",
    "stats": "Class-center statistics (counts, means, centred sums of squares; float64 accumulators)",
    "train_step": "End-to-end adversarial training step",
}


def _median(rec: Dict, mode: str) -> Optional[float]:
    t = rec.get("time", {}).get(mode)
    return t["median_ms"] if t else None


def _fmt_ms(rec: Dict, mode: str) -> str:
    t = rec.get("time", {}).get(mode)
    if not t:
        return "-"
    med = t["median_ms"]
    digits = 3 if med < 1 else 2 if med < 100 else 1
    return f"{med:.{digits}f} [{t['iqr_ms']:.{digits}f}]"


def _fmt_ratio(x: Optional[float]) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.2f}x" if x < 10 else f"{x:.1f}x" if x < 100 else f"{x:.0f}x"


def _fmt_err(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.1e}"


def _fmt_mb(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.1f}"


def by_case(records: Sequence[Dict], op: str) -> Dict[str, List[Dict]]:
    out: Dict[str, List[Dict]] = {}
    for r in records:
        if r["op"] == op:
            out.setdefault(r["case_name"], []).append(r)
    return out


def ratio(base: Optional[float], other: Optional[float]) -> Optional[float]:
    if base is None or other is None or other <= 0:
        return None
    return base / other


def _find(rows: Sequence[Dict], variant: str) -> Optional[Dict]:
    return next((r for r in rows if r["variant"] == variant), None)


def add_speedups(records: Sequence[Dict]) -> None:
    """Fill ``speedup_vs_<variant>`` (per mode) into each record, from medians of the same run."""
    for op in {r["op"] for r in records}:
        for rows in by_case(records, op).values():
            base = next((r for r in rows if r.get("baseline")), None)
            comp = _find(rows, "compile")
            floor = _find(rows, "read_floor")
            for r in rows:
                for mode in r.get("time", {}):
                    m = _median(r, mode)
                    sp = r.setdefault("speedup", {})
                    if base is not None:
                        sp.setdefault(mode, {})[f"vs_{base['variant']}"] = ratio(_median(base, mode), m)
                    if comp is not None:
                        sp.setdefault(mode, {})["vs_compile"] = ratio(_median(comp, mode), m)
                    if floor is not None:
                        sp.setdefault(mode, {})["x_read_floor"] = ratio(m, _median(floor, mode))


def markdown(result: Dict) -> str:
    env, records = result["environment"], result["records"]
    lines = [f"# fada_core benchmark results ({env['device']})", ""]
    if env.get("complete") is False:
        lines += ["**Partial results: the run was still going or was interrupted.**", ""]
    lines += _env_lines(result)
    for op in result["ops"]:
        cases = by_case(records, op)
        if not cases:
            continue
        lines += ["", f"## {op}: {OP_TITLES[op]}", ""]
        if op in ("loss", "ce"):
            lines += _loss_table(cases)
        elif op == "stats":
            lines += _stats_table(cases)
        else:
            lines += _train_table(cases)
        comp = [r for rows in cases.values() for r in rows if r.get("compile_s") is not None]
        if comp:
            lines += ["", "torch.compile time (first call minus steady-state forward+backward): "
                      + "; ".join(f"{r['case_name']}: {r['compile_s']:.1f} s" for r in comp)]
    isa = isa_lines(result)
    if isa:
        lines += ["", "## CPU instruction sets side by side (same run, interleaved)", ""] + isa
    lines += ["", "## Targets of issue 3, judged from this run alone", ""] + target_lines(result)
    return "\n".join(lines) + "\n"


ISAS = ("default", "avx2", "avx512")


def isa_lines(result: Dict) -> List[str]:
    """Per case, every instruction-set build of the CPU kernels against the official path (loss, ce:
    fwd+bwd) or the read floor (stats), then the targets of issue 11 judged from these figures."""
    records = result["records"]
    if not any(r["variant"].startswith("fada_kernel_") and "time" in r for r in records):
        return []
    cpu = result["environment"].get("kernels", {}).get("cpu_capability") or {}
    lines = [f"CPU kernel build picked at load time: {cpu.get('in_use', '?')} ({cpu.get('reason', '?')}). "
             "Each cell: median ms, and the speedup over the official path (loss, ce; fwd+bwd) or the ratio "
             "to the read floor `features.sum()` (stats).", "",
             "| op | shape | reference ms | " + " | ".join(f"{i} build" for i in ISAS) + " |", "|" + "---|" * 6]
    goals = []
    for op, mode, ref_name in (("loss", "fwdbwd", "official"), ("ce", "fwdbwd", "official"),
                               ("stats", "fwd", "read_floor")):
        for name, rows in by_case(records, op).items():
            ref = _find(rows, ref_name)
            if ref is None or "time" not in ref:
                continue
            cells = []
            for isa in ISAS:
                k = _find(rows, f"fada_kernel_{isa}")
                if k is None or "time" not in k:
                    cells.append("-" if k is None else "not run on this CPU")
                    continue
                x = ratio(_median(ref, mode), _median(k, mode)) if op != "stats" else ratio(
                    _median(k, mode), _median(ref, mode))
                cells.append(f"{_median(k, mode):.2f} ({_fmt_ratio(x)})")
                goals.append((op, name, isa, x))
            lines.append(f"| {op} | {name} | {ref['label']}: {_median(ref, mode):.2f} | " + " | ".join(cells) + " |")
    lines += ["", "Targets of issue 11 (B=1 K=19 65x129->512x1024; stats B=2 C=2048 65x129), from this run:", ""]
    wanted = {("loss", "avx512"): 10, ("loss", "avx2"): 10, ("loss", "default"): 5,
              ("ce", "avx512"): 5, ("ce", "avx2"): 5, ("ce", "default"): 5}
    for (op, isa), goal in wanted.items():
        x = next((x for o, n, i, x in goals if o == op and i == isa and n == "B=1 K=19 65x129->512x1024"), None)
        ok = None if x is None else x >= goal
        lines.append(f"- {op} fwd+bwd, {isa} build, >= {goal}x the official path: {_fmt_ratio(x)} -- "
                     + ("not measured" if ok is None else "**met**" if ok else "**not met**"))
    for isa in ("avx2", "avx512"):
        x = next((x for o, n, i, x in goals if o == "stats" and i == isa and n.startswith("B=2 C=2048 65x129")), None)
        ok = None if x is None else x <= 1.5
        lines.append(f"- class statistics, {isa} build, within 1.5x of features.sum(): {_fmt_ratio(x)} -- "
                     + ("not measured" if ok is None else "**met**" if ok else "**not met**"))
    return lines


def _env_lines(result: Dict) -> List[str]:
    env = result["environment"]
    k = env.get("kernels", {})
    dev = env.get("gpu") if env["device"] == "cuda" else env.get("cpu")
    if k.get("per_op"):
        kern = ", ".join(f"{op} {'yes' if ok else 'NO'}" for op, ok in k["per_op"].items())
        if k.get("disabled"):
            kern += " (FADA_CORE_DISABLE_KERNELS=1)"
        elif k.get("failure"):
            kern += f" (build/load failure: {str(k['failure']).strip().splitlines()[0][:200]})"
        kern += f"; csrc sha1 {k.get('sources_sha1')}"
    else:
        kern = f"NOT available ({str(k.get('failure', '?')).strip().splitlines()[0][:200]})"
    out = [
        f"- date (UTC): {env['date_utc']}; command: `{result['command']}`",
        f"- device: {env['device']} -- {dev}; torch threads: {env['threads']}; logical CPUs: {env['logical_cpus']}",
        f"- torch {env['torch']} (CUDA {env['torch_cuda']}, cuDNN {env['cudnn']}); python {env['python']}; "
        f"C++ compiler: {env['cxx']}; nvcc: {env['nvcc']}",
        f"- fada_core {env.get('fada_core', '?')} compiled kernels on {env['device']}: {kern}",
        f"- load average (1/5/15 min) at start {env.get('loadavg_start')}, at end {env.get('loadavg_end')}; "
        f"per op at its start: {env.get('loadavg_per_op')}; wall time {env.get('wall_s')} s",
        f"- repeats {result['settings']['repeats']} (interleaved), warm-up {result['settings']['warmup']}"
        + (f", at most ~{result['settings']['case_budget_s']:.0f} s of timing per case (3 rounds at least)"
           if result["settings"].get("case_budget_s") else "")
        + "; times are medians in ms with the IQR in brackets"
        + (" (CPU time of the one timing thread, not wall time)" if result["settings"].get("cpu_time") else ""),
    ]
    if env["device"] == "cpu":
        out.append("- extra peak memory: peak RSS during one call minus RSS before it, measured in a worker "
                   "process with MALLOC_MMAP_THRESHOLD_=65536 (see benchmarks/measure.py)")
    else:
        out.append("- extra peak memory: CUDA allocator peak during one call minus memory allocated before it")
    return out


def _table(columns: Sequence[str], cases: Dict[str, List[Dict]], cells: Callable[[Dict], List[str]]) -> List[str]:
    """A markdown table: a bold row per case, then one per variant: its label and ``cells(record)``,
    or its status when it has no timings (it failed or is unavailable)."""
    n = len(columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * n]
    for name, rows in cases.items():
        lines.append(f"| **{name}** |" + " |" * (n - 1))
        for r in rows:
            if "time" not in r:
                lines.append(f"| | {r['label']} | {r['status']} |" + " |" * (n - 3))
            else:
                lines.append(f"| | {r['label']} | " + " | ".join(cells(r)) + " |")
    return lines


def _loss_table(cases: Dict[str, List[Dict]]) -> List[str]:
    def cells(r: Dict) -> List[str]:
        sp, e = r.get("speedup", {}).get("fwdbwd", {}), r.get("errors", {})
        return [_fmt_ms(r, "fwd"), _fmt_ms(r, "fwdbwd"), _fmt_ratio(sp.get("vs_official")),
                _fmt_ratio(sp.get("vs_compile")), _fmt_mb(r.get("extra_peak_mb")), _fmt_err(e.get("value_abs")),
                _fmt_err(e.get("grad_rel")), _yes(r.get("bitwise_repeatable"))]

    return _table(("shape", "variant", "fwd ms [IQR]", "fwd+bwd ms [IQR]", "fwd+bwd speedup vs official",
                   "vs compile", "extra peak MB", "err value", "err grad (rel)", "same bits"), cases, cells)


def _stats_table(cases: Dict[str, List[Dict]]) -> List[str]:
    def cells(r: Dict) -> List[str]:
        sp, e = r.get("speedup", {}).get("fwd", {}), r.get("errors", {})
        return [_fmt_ms(r, "fwd"), _fmt_ratio(sp.get("x_read_floor")), _fmt_ratio(sp.get("vs_index_add")),
                _fmt_mb(r.get("extra_peak_mb")), _fmt_err(e.get("means_abs")), _fmt_err(e.get("m2_rel")),
                _yes(r.get("bitwise_repeatable"))]

    return _table(("shape", "variant", "ms [IQR]", "x read floor", "speedup vs index_add", "extra peak MB",
                   "err means (abs)", "err m2 (rel)", "same bits"), cases, cells)


def _train_table(cases: Dict[str, List[Dict]]) -> List[str]:
    def cells(r: Dict) -> List[str]:
        return [_fmt_ms(r, "step"), _fmt_ratio(r.get("speedup", {}).get("step", {}).get("vs_official")),
                _fmt_mb(r.get("extra_peak_mb"))]

    return _table(("case", "variant", "step ms [IQR]", "speedup vs official", "extra peak MB"), cases, cells)


def _yes(x) -> str:
    return "-" if x is None else "yes" if x else "NO"


def _case_rows(records, op, batch, k, h, w, H, W, channels=0) -> List[Dict]:
    return [
        r for r in records
        if r["op"] == op and (r["case"]["batch"], r["case"]["classes"], r["case"]["h"], r["case"]["w"],
                               r["case"]["H"], r["case"]["W"]) == (batch, k, h, w, H, W)
        and (not channels or r["case"]["channels"] == channels)
    ]


def target_lines(result: Dict) -> List[str]:
    """Each speed/memory target of issue 3 with the figure measured in this run, if any."""
    records, device = result["records"], result["environment"]["device"]
    out = []

    def verdict(ok: Optional[bool]) -> str:
        return "not measured" if ok is None else "**met**" if ok else "**not met**"

    # 1. CPU loss B=1 65x129 -> 512x1024.
    rows = _case_rows(records, "loss", 1, 19, 65, 129, 512, 1024)
    k, off, comp = _find(rows, "fada_kernel"), _find(rows, "official"), _find(rows, "compile")
    if device == "cpu":
        if k and "time" in k:
            s_off = ratio(_median(off, "fwdbwd"), _median(k, "fwdbwd")) if off else None
            s_comp = ratio(_median(comp, "fwdbwd"), _median(k, "fwdbwd")) if comp and "time" in comp else None
            ok = None if s_off is None else (s_off >= 10 and (s_comp is None or s_comp >= 10))
            out.append(
                f"- CPU loss, B=1, 65x129->512x1024, fwd+bwd, >= 10x vs official and vs torch.compile: kernel "
                f"{_median(k, 'fwdbwd'):.2f} ms, {_fmt_ratio(s_off)} vs official, {_fmt_ratio(s_comp)} vs compile"
                + ("" if comp and "time" in comp else " (compile not measured)") + f" -- {verdict(ok)}"
            )
            mem_k, mem_o = k.get("extra_peak_mb"), off.get("extra_peak_mb") if off else None
            okm = None if mem_k is None else mem_k <= 10
            out.append(f"- CPU loss extra memory 'a few MB instead of hundreds': kernel {_fmt_mb(mem_k)} MB, "
                       f"official {_fmt_mb(mem_o)} MB -- {verdict(okm)}")
        else:
            why = k["status"] if k else "case not run"
            out.append(f"- CPU loss, B=1, 65x129->512x1024, >= 10x: not measured -- kernel {why}")
    # 2. Stats within 1.5x of the read floor (B=2, C=2048, 65x129).
    rows = _case_rows(records, "stats", 2, 19, 65, 129, 65, 129, 2048)
    k, floor = _find(rows, "fada_kernel"), _find(rows, "read_floor")
    if k and "time" in k and floor and "time" in floor:
        x = ratio(_median(k, "fwd"), _median(floor, "fwd"))
        out.append(f"- {device.upper()} class statistics B=2 C=2048 65x129 within 1.5x of features.sum(): kernel "
                   f"{_median(k, 'fwd'):.2f} ms vs floor {_median(floor, 'fwd'):.2f} ms = {_fmt_ratio(x)} -- "
                   f"{verdict(x <= 1.5 if x else None)}")
    else:
        why = k["status"] if k else "case not run"
        out.append(f"- {device.upper()} class statistics within 1.5x of the read floor: not measured -- kernel {why}")
    # 3. GPU B=4 64x128 -> 512x1024.
    if device == "cuda":
        rows = _case_rows(records, "loss", 4, 19, 64, 128, 512, 1024)
        k, off, comp = _find(rows, "fada_kernel"), _find(rows, "official"), _find(rows, "compile")
        if k and "time" in k and off and "time" in off:
            t = _median(k, "fwdbwd")
            s_off = ratio(_median(off, "fwdbwd"), t)
            s_comp = ratio(_median(comp, "fwdbwd"), t) if comp and "time" in comp else None
            mem = ratio(k.get("extra_peak_mb"), off.get("extra_peak_mb")) if k.get("extra_peak_mb") else None
            frac = None if mem is None else 1 / mem
            out.append(f"- GPU B=4 64x128->512x1024 fwd+bwd: kernel {t * 1e3:.0f} us (target <= 150 us: "
                       f"{verdict(t * 1e3 <= 150)}), {_fmt_ratio(s_off)} vs official (>= 30x: "
                       f"{verdict(s_off >= 30 if s_off else None)}), {_fmt_ratio(s_comp)} vs compile (>= 10x: "
                       f"{verdict(s_comp >= 10 if s_comp else None)}), extra memory "
                       f"{'-' if frac is None else f'{100 * frac:.2f}%'} of official's (<= 1%: "
                       f"{verdict(frac <= 0.01 if frac is not None else None)})")
        else:
            out.append("- GPU B=4 64x128->512x1024 targets: not measured -- kernel "
                       + (k["status"] if k else "case not run"))
    else:
        out.append("- GPU targets (B=4 64x128->512x1024: >= 30x vs official, >= 10x vs compile, <= 150 us, "
                   "<= 1% memory): not measured in this run (device is the CPU)")
    return out


def plot(result: Dict, path: str) -> Optional[str]:
    """Speedup of each variant over the official path against output pixels (fwd+bwd); None if
    matplotlib is missing or there is nothing to plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    records = result["records"]
    ops = [op for op in ("loss", "ce") if any(r["op"] == op for r in records)]
    if not ops:
        return None
    fig, axes = plt.subplots(1, len(ops), figsize=(6 * len(ops), 4.2), squeeze=False)
    colors: Dict[str, str] = {}
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for ax, op in zip(axes[0], ops):
        # Lines: shapes whose low resolution is exactly output / 8 (the sweep and torchvision-style
        # pipeline shapes); crosses: the others (65x129, Caffe-style).
        lines: Dict[str, List] = {}
        points: Dict[str, List] = {}
        for rows in by_case(records, op).values():
            c = rows[0]["case"]
            if c["classes"] != 19 or c["batch"] != 1:
                continue
            target = lines if (c["H"], c["W"]) == (8 * c["h"], 8 * c["w"]) else points
            for r in rows:
                s = r.get("speedup", {}).get("fwdbwd", {}).get("vs_official")
                if s is None or r.get("baseline"):
                    continue
                target.setdefault(r["variant"], []).append((c["H"] * c["W"], s, r["label"]))
        series = sorted(set(lines) | set(points))
        for name in series:
            color = colors.setdefault(name, palette[len(colors) % len(palette)])
            label = (lines.get(name) or points.get(name))[0][2]
            pts = sorted(lines.get(name, []))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color, label=label)
                label = None
            pts = sorted(points.get(name, []))
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker="x", s=60, color=color, label=label)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("output pixels H x W (B=1, K=19; o: h x w = H/8 x W/8, x: 65x129)")
        ax.set_ylabel("speedup over official (fwd+bwd)")
        ax.set_title(f"{op} on {result['environment']['device']}")
        ax.grid(True, which="both", alpha=0.3)
        if series:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

