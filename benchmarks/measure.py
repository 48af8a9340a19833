"""How things are measured: timing, peak memory, errors, bit repeatability, environment.

Timing
    After warm-up, the variants of one case run interleaved, in a new seeded random order
    every round (so each variant follows each other one about equally often), each call on
    the next input set of a small pool of fresh random inputs. CPU: ``time.perf_counter``
    around the call. CUDA: CUDA events around the call, then a synchronize. "fwd" is the
    forward as run in training (inputs require grad, the graph is built); "fwdbwd" adds
    ``backward()``. Reported: median, quartiles and IQR in milliseconds.

Peak memory ("extra" = peak during one forward+backward minus what was live before it)
    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
    ``memory_allocated`` before the call.
    CPU: torch has no CPU allocator statistics, so the peak resident set is used, in a separate
    worker process started with ``MALLOC_MMAP_THRESHOLD_=65536``: every allocation above 64 KiB
    then gets its own mapping and is unmapped when freed, so the kernel's high-water mark
    (``VmHWM``, reset through ``/proc/self/clear_refs``) tracks the live tensor bytes, big
    full-resolution temporaries included, without glibc's free lists hiding reuse. The worker
    warms each variant up once (compiling it, for torch.compile) before measuring it. Timing
    runs in the ordinary process, with the default allocator, as users have it.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import random
import re
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from benchmarks import variants as V

MODES = {"loss": ("fwd", "fwdbwd"), "ce": ("fwd", "fwdbwd"), "stats": ("fwd",), "train_step": ("step",)}
FULL_MODE = {"loss": "fwdbwd", "ce": "fwdbwd", "stats": "fwd", "train_step": "step"}
POOL_BYTES = 512 * 2**20


# ----------------------------------------------------------------------------- running


def reset_grads(op: str, inputs: Dict[str, torch.Tensor]) -> None:
    key = V.GRAD_KEY.get(op)
    if key is not None:
        inputs[key].grad = None


def run(op: str, fn: Callable, inputs: Dict[str, torch.Tensor], mode: str):
    out = fn(inputs)
    if mode == "fwdbwd":
        out.backward()
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# The CPU clock: wall time, or (run.py --cpu-time, one thread) the calling thread's CPU time, which
# leaves out the time spent waiting for a core that other processes hold: a load-insensitive check.
CPU_CLOCK: Callable[[], float] = time.perf_counter


def timed(device: str, call: Callable[[], object]) -> float:
    """Seconds taken by ``call()`` (CUDA events on the GPU; :data:`CPU_CLOCK` on the CPU)."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = CPU_CLOCK()
    call()
    return CPU_CLOCK() - t0


def summarize(seconds: Sequence[float]) -> Dict[str, float]:
    t = torch.tensor(sorted(seconds), dtype=torch.float64) * 1e3
    q1, med, q3 = (torch.quantile(t, q).item() for q in (0.25, 0.5, 0.75))
    return {"median_ms": med, "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1, "min_ms": t[0].item(), "n": len(seconds)}


def pool_size(case: V.Case, repeats: int) -> int:
    per = max(V.input_bytes(case), 1)
    return int(max(1, min(4, repeats, POOL_BYTES // per)))


# ----------------------------------------------------------------------------- memory


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M).group(1))


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cuda_extra_peak_mb(op: str, fn: Callable, inputs: Dict, mode: str) -> float:
    reset_grads(op, inputs)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = run(op, fn, inputs, mode)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return (peak - base) / 2**20


def cpu_extra_peak_mb(op: str, fn: Callable, inputs: Dict, mode: str) -> float:
    """Peak RSS over the RSS before one call (meaningful in the memory worker process only)."""
    out = run(op, fn, inputs, mode)  # warm-up: lazy initialisation, compilation
    del out
    reset_grads(op, inputs)
    gc.collect()
    base = _proc_status_kb("VmRSS")
    if not _reset_hwm():
        raise RuntimeError("cannot reset VmHWM (/proc/self/clear_refs not writable)")
    out = run(op, fn, inputs, mode)
    peak = _proc_status_kb("VmHWM")
    del out
    return (peak - base) / 1024


def memory_worker(spec_path: str, out_path: str) -> None:
    """Entry of the CPU memory worker process: measures each job of the spec, writes JSON."""
    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(spec["threads"])
    results = []
    for job in spec["jobs"]:
        case = V.Case.from_dict(job["case"])
        variant = next(v for v in V.variants_for(case.op) if v.name == job["variant"])
        rec = {"case": job["case"], "variant": variant.name}
        try:
            inputs = V.make_inputs(case, "cpu", seed=12345)
            fn = variant.build(case, "cpu")
            rec["extra_peak_mb"] = cpu_extra_peak_mb(case.op, fn, inputs, FULL_MODE[case.op])
            del fn, inputs
        except Exception as exc:  # one failure must not lose the other measurements
            rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
        gc.collect()
        results.append(rec)
        with open(out_path, "w") as f:  # written after each job: a crash keeps what was done
            json.dump(results, f)


def cpu_memory(jobs: List[Dict], threads: int, workdir: str, timeout: float = 1800) -> List[Dict]:
    """Run the memory worker on ``jobs`` in a fresh process; returns its records."""
    os.makedirs(workdir, exist_ok=True)
    spec_path = os.path.join(workdir, "memory_spec.json")
    out_path = os.path.join(workdir, "memory_out.json")
    with open(spec_path, "w") as f:
        json.dump({"threads": threads, "jobs": jobs}, f)
    if os.path.exists(out_path):
        os.remove(out_path)
    # The worker may reuse torch.compile's on-disk caches: it measures memory, not compile time.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536",
               FADA_BENCH_COMPILE_CACHE="1")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run.py")
    proc = subprocess.run(
        [sys.executable, script, "--_memory-worker", spec_path, out_path],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    done = []
    if os.path.exists(out_path):
        with open(out_path) as f:
            done = json.load(f)
    if proc.returncode != 0:
        why = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        finished = {(json.dumps(r["case"], sort_keys=True), r["variant"]) for r in done}
        for job in jobs:
            if (json.dumps(job["case"], sort_keys=True), job["variant"]) not in finished:
                done.append({"case": job["case"], "variant": job["variant"], "error": f"worker died: {why[0]}"})
    return done


# ----------------------------------------------------------------------------- one case


class _CaseRun:
    """The variants of one case under measurement, and the pool of inputs they run on. ``fns`` holds
    the variants still in the race: one that fails a step leaves it, its record saying where."""

    def __init__(self, case: V.Case, variants: Sequence[V.Variant], device: str, repeats: int):
        self.case, self.op, self.full, self.device = case, case.op, FULL_MODE[case.op], device
        self.records: Dict[str, Dict] = {}
        self.fns: Dict[str, Callable] = {}
        for v in variants:
            self.records[v.name] = {
                "op": self.op, "case": case.as_dict(), "case_name": case.name, "variant": v.name, "label": v.label,
                "baseline": v.baseline, "status": "ok", "loadavg_at_start": loadavg()}
            try:
                self.fns[v.name] = v.build(case, device)
            except V.Unavailable as exc:
                self.records[v.name]["status"] = f"unavailable ({exc})"
            except Exception as exc:
                self.records[v.name]["status"] = f"error ({type(exc).__name__}: {exc})"[:400]
        self.pool = [V.make_inputs(case, device, seed=1000 + i) for i in range(pool_size(case, repeats))]

    def attempt(self, name: str, stage: str, step: Callable[[Callable], None]) -> None:
        """``step(fn)`` for variant ``name``; an exception drops the variant, naming ``stage``."""
        try:
            step(self.fns[name])
        except Exception as exc:
            self.records[name]["status"] = f"error in {stage} ({type(exc).__name__}: {str(exc)[:300]})"
            del self.fns[name]

    def call(self, fn: Callable, x: Dict[str, torch.Tensor], mode: str) -> float:
        """Seconds taken by one call of ``fn`` on inputs ``x``, their gradients reset first."""
        reset_grads(self.op, x)
        return timed(self.device, lambda: run(self.op, fn, x, mode))

    def warm_up(self, warmup: int) -> None:
        """The first calls; a compiled variant's first includes its compilation (``first_call_s``)."""
        def step(name: str, fn: Callable) -> None:
            for i in range(max(1, warmup)):
                t = self.call(fn, self.pool[i % len(self.pool)], self.full)
                if i == 0:
                    self.records[name]["first_call_s"] = t

        for name in list(self.fns):
            self.attempt(name, "warm-up", lambda fn: step(name, fn))

    def check_correctness(self) -> None:
        """Errors against float64, and bitwise repeatability (the same input twice)."""
        x, key = self.pool[0], V.GRAD_KEY[self.op]
        ref = V.reference(self.case, x)

        def twice(fn: Callable) -> List[tuple]:
            outs = []
            for _ in range(2):
                reset_grads(self.op, x)
                out = run(self.op, fn, x, self.full)
                grad = x[key].grad.detach().clone() if key else None
                outs.append((out.detach() if isinstance(out, torch.Tensor) else out, grad))
            return outs

        def step(record: Dict, fn: Callable) -> None:
            (out, grad), (out2, grad2) = twice(fn)
            record["errors"] = V.errors(self.case, out, grad, ref)
            record["bitwise_repeatable"] = V.same_bits(out, out2) and (not key or bool(torch.equal(grad, grad2)))

        for name in list(self.fns):
            self.attempt(name, "correctness check", lambda fn: step(self.records[name], fn))
        reset_grads(self.op, x)

    def measure_cuda_memory(self) -> None:
        for name in list(self.fns):
            self.attempt(name, "memory", lambda fn: self.records[name].update(
                extra_peak_mb=cuda_extra_peak_mb(self.op, fn, self.pool[0], self.full)))

    def time_rounds(self, repeats: int, budget_s: float, min_repeats: int) -> Dict[str, Dict[str, List[float]]]:
        """Interleaved timing rounds: ``{variant: {mode: seconds of each call}}``."""
        modes = MODES[self.op]
        samples: Dict[str, Dict[str, List[float]]] = {n: {m: [] for m in modes} for n in self.fns}
        counter = 0
        order_rng = random.Random(f"{self.case}")
        t_start = time.perf_counter()
        for rnd in range(repeats):
            if budget_s > 0 and rnd >= min_repeats and time.perf_counter() - t_start > budget_s:
                break
            for mode in modes:
                # A fresh (seeded) order every round, so that no variant always runs
                # right after the same one: a variant that leaves hundreds of MB of
                # dirty cache lines and freed pages behind slows whatever comes next.
                # (Rotating A B C -> B C A keeps every neighbour: C still follows B.)
                names = list(self.fns)
                order_rng.shuffle(names)
                for name in names:
                    if name not in self.fns:
                        continue
                    x = self.pool[counter % len(self.pool)]
                    counter += 1
                    self.attempt(name, f"timing {mode}", lambda fn: samples[name][mode].append(self.call(fn, x, mode)))
            for x in self.pool:
                reset_grads(self.op, x)
        return samples

    def summarize(self, samples: Dict[str, Dict[str, List[float]]], compiled: Sequence[str]) -> None:
        """Each surviving variant's ``time``; ``compile_s`` (first call minus the median) for ``compiled``."""
        for name, per_mode in samples.items():
            if name not in self.fns:
                continue
            rec = self.records[name]
            rec["time"] = {m: summarize(s) for m, s in per_mode.items() if s}
            if "first_call_s" in rec and self.full in rec["time"] and name in compiled:
                rec["compile_s"] = rec["first_call_s"] - rec["time"][self.full]["median_ms"] / 1e3

    def release(self) -> None:
        """Free the variants and inputs before the next case is measured."""
        self.fns.clear()
        self.pool.clear()
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def log(self, log: Callable[[str], None]) -> None:
        for rec in self.records.values():
            t = rec.get("time", {}).get(self.full)
            log(f"  {rec['variant']:<12} "
                + (f"{self.full} {t['median_ms']:9.2f} ms (IQR {t['iqr_ms']:.2f})" if t else rec["status"]))


def measure_case(
    case: V.Case,
    variants: Sequence[V.Variant],
    device: str,
    repeats: int,
    warmup: int,
    log: Callable[[str], None] = print,
    budget_s: float = 0.0,
    min_repeats: int = 3,
) -> List[Dict]:
    """Time, check and (on CUDA) memory-profile every variant of ``case``; one record each.

    ``budget_s`` > 0 stops the timing rounds once they have taken that long, after at least
    ``min_repeats`` rounds (the sample count ``n`` is in each summary).
    """
    case_run = _CaseRun(case, variants, device, repeats)
    case_run.warm_up(warmup)
    if case.op != "train_step":
        case_run.check_correctness()
    if device == "cuda":
        case_run.measure_cuda_memory()
    samples = case_run.time_rounds(repeats, budget_s, min_repeats)
    case_run.summarize(samples, compiled=[v.name for v in variants if v.compiled])
    case_run.release()
    case_run.log(log)
    return list(case_run.records.values())


# ----------------------------------------------------------------------------- environment


def _first_line(cmd: List[str]) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in (out.stdout or out.stderr).splitlines() if line.strip()]
    return lines[0] if lines else None


def _nvcc() -> Optional[str]:
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            try:
                out = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True,
                                     text=True, timeout=30).stdout
            except (OSError, subprocess.SubprocessError):
                return None
            m = re.search(r"release [^\n]*", out)
            return m.group(0) if m else None
    return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.M)
            if m:
                return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> List[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def busy_processes(n: int = 5) -> List[str]:
    """The processes using the most CPU right now (``ps``), to document the load conditions."""
    try:
        out = subprocess.run(["ps", "-eo", "pcpu,etimes,comm", "--sort=-pcpu"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [" ".join(line.split()) for line in out.strip().splitlines()[1 : n + 1]]


def kernel_sources_digest() -> Optional[str]:
    """SHA-1 over fada_core/csrc (names and contents): which kernel sources were measured."""
    import hashlib

    try:
        import fada_core
    except Exception:
        return None
    root = os.path.join(os.path.dirname(fada_core.__file__), "csrc")
    h = hashlib.sha1()
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:12]


def environment(device: str, threads: int) -> Dict:
    env = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "requested_threads": threads,
        "cxx": _first_line([os.environ.get("CXX", "c++"), "--version"]),
        "nvcc": _nvcc(),
        "platform": platform.platform(),
        "loadavg_start": loadavg(),
        "busy_processes_start": busy_processes(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = props.name
        env["gpu_capability"] = f"{props.major}.{props.minor}"
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["cuda_driver"] = _first_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    try:
        import fada_core
        from fada_core import _build

        env["fada_core"] = getattr(fada_core, "__version__", "?")
        per_op = {op: _build.kernels_available(device, op)
                  for op in ("fada_loss", "upsampled_cross_entropy", "class_center_stats")}
        st = _build.status()
        env["kernels"] = {
            "available_on_device": all(per_op.values()),
            "per_op": per_op,
            "loaded": st.get("loaded"),
            "origin": st.get("origin"),
            "library": st.get("library"),
            "failure": st.get("failure"),
            "disabled": st.get("disabled"),
            "ops": st.get("ops"),
            "cuda_kernels_reason": st.get("cuda_kernels_reason"),
            "cpu_capability": st.get("cpu_capability"),
            "sources_sha1": kernel_sources_digest(),
        }
    except Exception as exc:
        env["kernels"] = {"available_on_device": False, "failure": f"{type(exc).__name__}: {exc}"}
    return env
