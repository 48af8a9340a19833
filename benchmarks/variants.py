"""What is measured: the cases (shapes), their inputs, the float64 references, and the variants.

Three operators are compared, each in several implementations ("variants"):

``loss``  the FADA soft-label loss on discriminator logits (B, 2K, h, w) and segmentation
          logits (B, K, h, w), both brought to (H, W).
          official  -- the official code path, transcribed: interpolate both to full resolution,
                       divide by T, softmax, cap by masked assignment, ``cat`` with ``zeros_like``,
                       ``-(y * log_softmax(z)).sum(1).mean()``.
          careful   -- the same in eager PyTorch without the cat/zeros encoding and without
                       autograd on the soft label (what a careful user writes by hand).
          compile   -- ``torch.compile`` of ``official`` (compile time reported separately).
          fada_eager / fada_kernel -- ``fada_core.FADALoss(backend="eager" | "kernel")``.
``ce``    the upsampled segmentation cross-entropy: logits (B, K, h, w), labels (B, H, W).
          official  -- ``F.interpolate`` + ``div(T)`` + ``nn.CrossEntropyLoss(ignore_index=255)``.
          compile, fada_eager, fada_kernel -- as above (``UpsampledCrossEntropy``).
``stats`` per-class counts, means and centred sums of squares of features (B, C, h, w).
          fada_eager / fada_kernel -- ``fada_core.functional.class_center_stats``.
          index_add -- the direct float64 ``index_add_`` a user writes (one pass, sum of squares).
          onehot_mm -- one-hot matrix product (batched GEMM in the features' dtype).
          read_floor -- ``features.sum()``: reading the features once, the lower bound.

Every variant is a function ``inputs -> output``; ``Unavailable`` says why one cannot run here.
The end-to-end training step lives in :mod:`benchmarks.train_step`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

TEMPERATURE = 1.8
CAP = 0.9
IGNORE_INDEX = 255
NUM_CLASSES = 19
DOMAIN = "source"  # the [a, 0] encoding: the generator step and the source half of the D step
STATS_CHANNELS = 2048

OPS = ("loss", "ce", "stats", "train_step")
GROUPS = ("pipeline", "small", "sweep_hw", "sweep_k", "stats", "e2e")


class Unavailable(Exception):
    """A variant cannot run in this environment (the message says why)."""


@dataclass(frozen=True)
class Case:
    """One shape of one operator. ``h x w`` is the low (logit/feature) resolution, ``H x W`` the
    output resolution (for ``stats`` both are the feature resolution; for ``train_step`` they are
    the target crop, ``src_h x src_w`` the source crop)."""

    op: str
    batch: int
    classes: int
    h: int
    w: int
    H: int
    W: int
    group: str = "pipeline"
    channels: int = 0
    src_h: int = 0
    src_w: int = 0
    backbone: str = ""

    @property
    def key(self) -> Tuple:
        return dataclasses.astuple(dataclasses.replace(self, group=""))

    @property
    def name(self) -> str:
        if self.op == "stats":
            return f"B={self.batch} C={self.channels} {self.h}x{self.w} (N={self.pixels}) K={self.classes}"
        if self.op == "train_step":
            return (
                f"{self.backbone} B={self.batch}/domain tgt {self.H}x{self.W} src {self.src_h}x{self.src_w} "
                f"K={self.classes}"
            )
        return f"B={self.batch} K={self.classes} {self.h}x{self.w}->{self.H}x{self.W}"

    @property
    def pixels(self) -> int:
        """Pixels the operator visits: output pixels (loss, ce) or feature pixels (stats)."""
        return self.batch * self.H * self.W

    def as_dict(self) -> Dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: Dict) -> "Case":
        return Case(**d)


# ----------------------------------------------------------------------------- shapes

PIPELINE_SHAPES = (((64, 128), (512, 1024)), ((65, 129), (512, 1024)), ((90, 160), (720, 1280)))
SMALL_SHAPE = ((16, 32), (128, 256))
SWEEP_HW = ((128, 256), (256, 512), (512, 1024), (1024, 2048))
SWEEP_K = (4, 8, 19, 38)
SWEEP_K_SHAPE = ((32, 64), (256, 512))
STATS_SHAPES = ((1, 64, 128), (2, 65, 129), (4, 64, 128), (2, 160, 320))  # N = 8k, 16.8k, 33k, 102k


def default_cases(op: str, groups: Sequence[str], quick: bool, device: str) -> List[Case]:
    """The shapes of ``op`` in the selected groups; ``quick`` keeps the essential ones."""
    cases: List[Case] = []
    k = NUM_CLASSES
    if op in ("loss", "ce"):
        if "pipeline" in groups:
            pairs = [(b, shape) for b in (1, 4) for shape in PIPELINE_SHAPES]
            if device == "cpu":
                # B=4 costs 4x and adds little on 2 cores: only the GPU target shape.
                pairs = [(1, shape) for shape in PIPELINE_SHAPES] + [(4, PIPELINE_SHAPES[0])]
            if quick:  # the CPU target shape, plus the GPU target shape on a GPU
                pairs = [(1, PIPELINE_SHAPES[1])] + ([(4, PIPELINE_SHAPES[0])] if device == "cuda" else [])
            for b, ((h, w), (H, W)) in pairs:
                cases.append(Case(op, b, k, h, w, H, W, "pipeline"))
        if "small" in groups:
            (h, w), (H, W) = SMALL_SHAPE
            cases.append(Case(op, 1, k, h, w, H, W, "small"))
        if "sweep_hw" in groups:
            for H, W in SWEEP_HW[:2] if quick else SWEEP_HW:
                cases.append(Case(op, 1, k, H // 8, W // 8, H, W, "sweep_hw"))
            if quick:  # one real-size point so the plot spans the pipeline resolution
                cases.append(Case(op, 1, k, 64, 128, 512, 1024, "sweep_hw"))
        if "sweep_k" in groups:
            (h, w), (H, W) = SWEEP_K_SHAPE
            for kk in (4, 19, 38) if quick else SWEEP_K:
                cases.append(Case(op, 1, kk, h, w, H, W, "sweep_k"))
    elif op == "stats":
        if "stats" in groups or "pipeline" in groups:
            for b, h, w in STATS_SHAPES[:2] if quick else STATS_SHAPES:
                cases.append(Case(op, b, k, h, w, h, w, "stats", channels=STATS_CHANNELS))
    elif op == "train_step":
        if "e2e" in groups or "pipeline" in groups:
            if device == "cuda":
                cases.append(Case(op, 1, k, 64, 128, 512, 1024, "e2e", src_h=720, src_w=1280, backbone="resnet101"))
            elif quick:
                cases.append(Case(op, 1, k, 16, 32, 128, 256, "e2e", src_h=184, src_w=320, backbone="small"))
            else:
                cases.append(Case(op, 1, k, 32, 64, 256, 512, "e2e", src_h=360, src_w=640, backbone="small"))
    return dedupe(cases)


def dedupe(cases: Sequence[Case]) -> List[Case]:
    seen, out = set(), []
    for c in cases:
        if c.key not in seen:
            seen.add(c.key)
            out.append(c)
    return out


def parse_shape(op: str, text: str) -> Case:
    """An explicit shape: ``BxKxhxw-HxW`` for loss/ce, ``BxCxhxw`` for stats (K = 19)."""
    try:
        if op == "stats":
            b, c, h, w = (int(v) for v in text.split("x"))
            return Case(op, b, NUM_CLASSES, h, w, h, w, "custom", channels=c)
        low, high = text.split("-")
        b, k, h, w = (int(v) for v in low.split("x"))
        H, W = (int(v) for v in high.split("x"))
        return Case(op, b, k, h, w, H, W, "custom")
    except ValueError as exc:
        form = "BxCxhxw" if op == "stats" else "BxKxhxw-HxW"
        raise ValueError(f"shape {text!r} for op {op!r} must look like {form}") from exc


# ----------------------------------------------------------------------------- inputs


def input_bytes(case: Case) -> int:
    """Approximate bytes of one input set (to size the pool of fresh inputs)."""
    b, k = case.batch, case.classes
    if case.op == "loss":
        return 4 * 3 * k * b * case.h * case.w
    if case.op == "ce":
        return 4 * k * b * case.h * case.w + 8 * b * case.H * case.W
    if case.op == "stats":
        return 4 * case.channels * b * case.h * case.w + 8 * b * case.h * case.w
    return 4 * 3 * b * (case.H * case.W + case.src_h * case.src_w) + 8 * b * case.src_h * case.src_w


def make_inputs(case: Case, device: str, seed: int, dtype: torch.dtype = torch.float32) -> Dict[str, Tensor]:
    """Fresh random, non-zero inputs. Logit scales make the soft labels reach the 0.9 cap."""
    g = torch.Generator().manual_seed(seed)
    b, k, h, w = case.batch, case.classes, case.h, case.w

    def labels(shape: Tuple[int, ...]) -> Tensor:
        y = torch.randint(0, k, shape, generator=g)
        y[torch.rand(shape, generator=g) < 0.1] = IGNORE_INDEX
        return y.to(device)

    if case.op == "loss":
        disc = (torch.randn(b, 2 * k, h, w, generator=g) * 2.0).to(device=device, dtype=dtype)
        seg = (torch.randn(b, k, h, w, generator=g) * 4.0).to(device=device, dtype=dtype)
        return {"disc": disc.requires_grad_(), "seg": seg}
    if case.op == "ce":
        logits = (torch.randn(b, k, h, w, generator=g) * 3.0).to(device=device, dtype=dtype)
        return {"logits": logits.requires_grad_(), "labels": labels((b, case.H, case.W))}
    if case.op == "stats":
        feats = torch.rand(b, case.channels, h, w, generator=g).to(device=device, dtype=dtype)
        return {"features": feats, "labels": labels((b, h, w))}
    if case.op == "train_step":
        from benchmarks.train_step import make_train_inputs

        return make_train_inputs(case, device, seed)
    raise ValueError(f"no inputs for op {case.op!r}")


GRAD_KEY = {"loss": "disc", "ce": "logits", "stats": None, "train_step": None}


# ----------------------------------------------------------------------------- official formulas


def _up(x: Tensor, size: Tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def official_soft_label_cross_entropy(pred: Tensor, soft_label: Tensor) -> Tensor:
    """train_adv.py's ``soft_label_cross_entropy`` without pixel weights."""
    loss = -soft_label.float() * F.log_softmax(pred, dim=1)
    return torch.mean(torch.sum(loss, dim=1))


def official_loss(disc: Tensor, seg: Tensor, size: Tuple[int, int], domain: str = DOMAIN) -> Tensor:
    """The official path: classifier and discriminator upsample to full resolution inside their
    forward, then /T, softmax, detach, masked cap, cat with zeros_like, soft-label CE."""
    disc_up = _up(disc, size)
    pred = _up(seg, size).div(TEMPERATURE)
    soft = F.softmax(pred, dim=1).detach()
    soft[soft > CAP] = CAP
    zeros = torch.zeros_like(soft)
    target = torch.cat((soft, zeros) if domain == "source" else (zeros, soft), dim=1)
    return official_soft_label_cross_entropy(disc_up, target)


def careful_loss(disc: Tensor, seg: Tensor, size: Tuple[int, int], domain: str = DOMAIN) -> Tensor:
    """Eager, written with care: no 2K-channel encoding, no autograd through the soft label."""
    k = seg.shape[1]
    with torch.no_grad():
        soft = torch.softmax(_up(seg, size) / TEMPERATURE, dim=1).clamp_(max=CAP)
    log_p = F.log_softmax(_up(disc, size), dim=1)
    half = log_p[:, :k] if domain == "source" else log_p[:, k:]
    return -(soft * half).sum(dim=1).mean()


def official_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Classifier upsamples, ``div(T)``, ``nn.CrossEntropyLoss(ignore_index=255)``."""
    pred = _up(logits, tuple(labels.shape[-2:])).div(TEMPERATURE)
    return torch.nn.functional.cross_entropy(pred, labels, ignore_index=IGNORE_INDEX)


def stats_index_add(features: Tensor, labels: Tensor, k: int) -> Tuple[Tensor, Tensor, Tensor]:
    """What a user writes: float64 copy, ``index_add_`` of counts, sums and squared norms."""
    c = features.shape[1]
    x = features.permute(0, 2, 3, 1).reshape(-1, c).double()
    y = labels.reshape(-1)
    keep = y != IGNORE_INDEX
    x, y = x[keep], y[keep]
    counts = torch.zeros(k, dtype=torch.float64, device=x.device).index_add_(0, y, torch.ones_like(x[:, 0]))
    sums = torch.zeros(k, c, dtype=torch.float64, device=x.device).index_add_(0, y, x)
    sq = torch.zeros(k, dtype=torch.float64, device=x.device).index_add_(0, y, (x * x).sum(1))
    means = sums / counts.clamp(min=1).unsqueeze(1)
    return counts, means, sq - counts * (means * means).sum(1)


def stats_onehot(features: Tensor, labels: Tensor, k: int) -> Tuple[Tensor, Tensor, Tensor]:
    """One-hot batched GEMM in the features' dtype: (B, C, P) @ (B, P, K), then float64."""
    b, c = features.shape[:2]
    x = features.reshape(b, c, -1)
    y = labels.reshape(b, -1)
    y = torch.where(y == IGNORE_INDEX, torch.full_like(y, k), y)
    onehot = F.one_hot(y, k + 1)[..., :k].to(features.dtype)  # (B, P, K)
    counts = onehot.sum((0, 1)).double()
    sums = torch.bmm(x, onehot).sum(0).t().double()  # (K, C)
    sq = torch.bmm((x * x).sum(1, keepdim=True), onehot).sum((0, 1)).double()
    means = sums / counts.clamp(min=1).unsqueeze(1)
    return counts, means, sq - counts * (means * means).sum(1)


def stats_floor(features: Tensor, labels: Tensor, k: int) -> Tensor:
    return features.sum()


# ----------------------------------------------------------------------------- references


def reference(case: Case, inputs: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """float64 results: ``value`` and ``grad`` (loss, ce) or ``counts/means/m2`` (stats)."""
    if case.op in ("loss", "ce"):
        key = GRAD_KEY[case.op]
        x = inputs[key].detach().double().requires_grad_()
        if case.op == "loss":
            value = official_loss(x, inputs["seg"].double(), (case.H, case.W))
        else:
            value = official_ce(x, inputs["labels"])
        (grad,) = torch.autograd.grad(value, x)
        return {"value": value.detach(), "grad": grad}
    if case.op == "stats":
        f = inputs["features"].double()
        c = f.shape[1]
        x = f.permute(0, 2, 3, 1).reshape(-1, c)
        y = inputs["labels"].reshape(-1)
        keep = y != IGNORE_INDEX
        x, y = x[keep], y[keep]
        counts = torch.bincount(y, minlength=case.classes).double()
        means = torch.zeros(case.classes, c, dtype=torch.float64, device=x.device).index_add_(0, y, x)
        means /= counts.clamp(min=1).unsqueeze(1)
        m2 = torch.zeros(case.classes, dtype=torch.float64, device=x.device)
        m2.index_add_(0, y, ((x - means[y]) ** 2).sum(1))
        return {"counts": counts, "means": means, "m2": m2}
    raise ValueError(case.op)


def errors(case: Case, out, grad: Optional[Tensor], ref: Dict[str, Tensor]) -> Dict[str, float]:
    """Max abs errors against the float64 reference (gradient also relative to its max)."""
    if case.op in ("loss", "ce"):
        value = out.detach().double()
        g = grad.double()
        diff = (g - ref["grad"]).abs().max().item()
        scale = ref["grad"].abs().max().item() or 1.0
        return {
            "value_abs": abs(value.item() - ref["value"].item()),
            "grad_abs": diff,
            "grad_rel": diff / scale,
        }
    if case.op == "stats":
        if isinstance(out, Tensor):  # the read floor computes no statistics
            return {}
        counts, means, m2 = (t.double() for t in _stats_tuple(out))
        scale = ref["m2"].abs().max().item() or 1.0
        return {
            "counts_abs": (counts - ref["counts"]).abs().max().item(),
            "means_abs": (means - ref["means"]).abs().max().item(),
            "m2_rel": (m2 - ref["m2"]).abs().max().item() / scale,
        }
    return {}


def _stats_tuple(out) -> Tuple[Tensor, Tensor, Tensor]:
    if hasattr(out, "counts"):
        return out.counts, out.means, out.m2
    return tuple(out)  # type: ignore[return-value]


def same_bits(a, b) -> bool:
    if isinstance(a, Tensor):
        return bool(torch.equal(a, b))
    return all(same_bits(x, y) for x, y in zip(_flatten(a), _flatten(b)))


def _flatten(out) -> List[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if hasattr(out, "counts"):
        return list(_stats_tuple(out))
    return list(out)


# ----------------------------------------------------------------------------- variants


@dataclass
class Variant:
    """``build(case, device)`` returns ``fn(inputs) -> output`` or raises :class:`Unavailable`."""

    name: str
    label: str
    build: Callable[[Case, str], Callable[[Dict[str, Tensor]], object]]
    baseline: bool = False  # the "official" row that speedups are measured against
    compiled: bool = False
    cpu_isa: Optional[str] = None  # a kernel variant pinned to one instruction-set build (CPU only)


def kernel_unavailable_reason(device: str, op: str) -> Optional[str]:
    """None when fada_core's compiled kernel for ``op`` runs on ``device``, else why not."""
    try:
        from fada_core import _build
    except Exception as exc:  # pragma: no cover - depends on the checkout
        return f"fada_core._build not importable: {exc!r}"
    try:
        if _build.kernels_available(device, op):
            return None
        st = _build.status()
    except Exception as exc:  # never let a status query kill the benchmark
        return f"kernels_available raised {exc!r}"
    if st.get("disabled"):
        return "FADA_CORE_DISABLE_KERNELS=1"
    if st.get("failure"):
        return str(st["failure"]).strip().splitlines()[0][:300]
    if device == "cuda" and st.get("cuda_kernels_reason"):
        return f"CUDA kernels: {st['cuda_kernels_reason']}"
    return f"op {op!r} has no {device} kernel in the loaded extension"


_COMPILED: Dict[str, Callable] = {}


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn, dynamic=False)``, one wrapper per function, recompiling per shape."""
    if fn.__name__ not in _COMPILED:
        import os

        import torch._dynamo as dynamo

        if os.environ.get("FADA_BENCH_COMPILE_CACHE", "") != "1":
            # Report a cold compilation, as a user's first run has it, not a hit in the on-disk caches.
            import torch._functorch.config as functorch_config
            import torch._inductor.config as inductor_config

            inductor_config.fx_graph_cache = False
            if hasattr(functorch_config, "enable_autograd_cache"):
                functorch_config.enable_autograd_cache = False
            # Inductor also caches the generated C++/Triton by source hash: start from an empty dir.
            import atexit
            import shutil
            import tempfile

            fresh = tempfile.mkdtemp(prefix="fada_bench_inductor_")
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = fresh
            atexit.register(shutil.rmtree, fresh, True)

        for attr in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo.config, attr):
                setattr(dynamo.config, attr, max(getattr(dynamo.config, attr), 256))
        _COMPILED[fn.__name__] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn.__name__]


def _fada():
    try:
        import fada_core
        import fada_core.functional  # noqa: F401
    except Exception as exc:
        raise Unavailable(f"fada_core not importable: {exc!r}") from exc
    return fada_core


CPU_ISAS = ("default", "avx2", "avx512")  # the builds of the CPU kernels (fada_core._build.cpu_capability)
_load_time_isa: List[str] = []  # the build the dispatcher picked when the kernels loaded


def _on_cpu_isa(isa: Optional[str], build: Callable) -> Callable:
    """Kernel variant ``build`` with the CPU kernels of build ``isa`` (None: the one picked at load time).

    Every call selects its build, which then stays selected through the backward that follows it, until
    another kernel variant's call: so all builds are timed interleaved, in one process, under the same
    load. (FADA_CORE_CPU_CAPABILITY picks the same builds at load time; tests/test_build.py checks that.)
    """

    def wrapped(case, device):
        fn = build(case, device)  # loads the kernels, or raises Unavailable
        if device != "cpu":
            if isa is not None:
                raise Unavailable("instruction-set builds are of the CPU kernels")
            return fn
        from fada_core import _build

        cpu = _build.cpu_capability()
        if not _load_time_isa:
            _load_time_isa.append(cpu["in_use"])
        name = isa or _load_time_isa[0]
        if name not in cpu["supported"]:
            raise Unavailable(f"this CPU runs only the {', '.join(cpu['supported'])} builds")

        def call(x):
            _build.set_cpu_capability(name)
            return fn(x)

        return call

    return wrapped


def _kernel_variants(build: Callable) -> List[Variant]:
    """``fada_kernel`` (the CPU build picked at load time) and ``fada_kernel_<isa>`` for every CPU build."""
    return [Variant("fada_kernel", "fada_core kernel", _on_cpu_isa(None, build))] + [
        Variant(f"fada_kernel_{isa}", f"fada_core kernel, {isa} build", _on_cpu_isa(isa, build), cpu_isa=isa)
        for isa in CPU_ISAS
    ]


def _loss_variants() -> List[Variant]:
    def official(case, device):
        size = (case.H, case.W)
        return lambda x: official_loss(x["disc"], x["seg"], size)

    def careful(case, device):
        size = (case.H, case.W)
        return lambda x: careful_loss(x["disc"], x["seg"], size)

    def compile_(case, device):
        fn, size = compiled(official_loss), (case.H, case.W)
        return lambda x: fn(x["disc"], x["seg"], size)

    def fada(backend):
        def build(case, device):
            fc = _fada()
            if backend == "kernel":
                reason = kernel_unavailable_reason(device, "fada_loss")
                if reason:
                    raise Unavailable(reason)
            crit = fc.FADALoss(case.classes, temperature=TEMPERATURE, cap=CAP, backend=backend)
            size = (case.H, case.W)
            return lambda x: crit(x["disc"], x["seg"], DOMAIN, size=size)

        return build

    return [
        Variant("official", "official (interpolate, cat/zeros)", official, baseline=True),
        Variant("careful", "careful eager (no cat/zeros)", careful),
        Variant("compile", "torch.compile(official)", compile_, compiled=True),
        Variant("fada_eager", "fada_core eager", fada("eager")),
        *_kernel_variants(fada("kernel")),
    ]


def _ce_variants() -> List[Variant]:
    def official(case, device):
        return lambda x: official_ce(x["logits"], x["labels"])

    def compile_(case, device):
        fn = compiled(official_ce)
        return lambda x: fn(x["logits"], x["labels"])

    def fada(backend):
        def build(case, device):
            fc = _fada()
            if backend == "kernel":
                reason = kernel_unavailable_reason(device, "upsampled_cross_entropy")
                if reason:
                    raise Unavailable(reason)
            ce = fc.UpsampledCrossEntropy(temperature=TEMPERATURE, ignore_index=IGNORE_INDEX, backend=backend)
            return lambda x: ce(x["logits"], x["labels"])

        return build

    return [
        Variant("official", "official (interpolate + CrossEntropyLoss)", official, baseline=True),
        Variant("compile", "torch.compile(official)", compile_, compiled=True),
        Variant("fada_eager", "fada_core eager", fada("eager")),
        *_kernel_variants(fada("kernel")),
    ]


def _stats_variants() -> List[Variant]:
    def plain(fn):
        return lambda case, device: (lambda x: fn(x["features"], x["labels"], case.classes))

    def fada(backend):
        def build(case, device):
            fc = _fada()
            if backend == "kernel":
                reason = kernel_unavailable_reason(device, "class_center_stats")
                if reason:
                    raise Unavailable(reason)
            stats = fc.functional.class_center_stats
            return lambda x: stats(x["features"], x["labels"], case.classes, IGNORE_INDEX, backend=backend)

        return build

    return [
        Variant("index_add", "index_add_ in float64", plain(stats_index_add), baseline=True),
        Variant("onehot_mm", "one-hot matmul", plain(stats_onehot)),
        Variant("read_floor", "read floor: features.sum()", plain(stats_floor)),
        Variant("fada_eager", "fada_core eager", fada("eager")),
        *_kernel_variants(fada("kernel")),
    ]


def variants_for(op: str, names: Optional[Sequence[str]] = None) -> List[Variant]:
    if op == "loss":
        vs = _loss_variants()
    elif op == "ce":
        vs = _ce_variants()
    elif op == "stats":
        vs = _stats_variants()
    elif op == "train_step":
        from benchmarks.train_step import train_variants

        vs = train_variants()
    else:
        raise ValueError(f"unknown op {op!r}; choose from {OPS}")
    if names:
        vs = [v for v in vs if v.name in names or v.baseline]
    return vs
