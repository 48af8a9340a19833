"""Running several stages in sequence (``--stage all``) and the summary table."""
from __future__ import annotations

import csv
import os
from typing import Any, Dict, List, Optional, Sequence


from . import distributed as D
from .checkpoint import latest_checkpoint, load_checkpoint
from .trainer import (StageResult, evaluate_models, pseudo_label_dir, score_pseudo_labels, train_stage,
                      target_is_synthetic)

__all__ = ["STAGE_TITLES", "run_pipeline", "format_summary", "write_summary_csv"]

STAGE_TITLES = {"src": "1 source only", "adv": "2 FADA (adversarial)", "sd": "3 self-distillation"}


def _chain(stage: str, cfg: Dict[str, Any], previous: Dict[str, StageResult], root: Optional[str]) -> Dict[str, Any]:
    cfg = dict(cfg)
    if root is not None:
        cfg["output_dir"] = os.path.join(root, stage)
    if stage == "adv" and not cfg["init_from"] and "src" in previous:
        cfg["init_from"] = previous["src"].checkpoint
    if stage == "sd" and not cfg["teacher"] and "adv" in previous:
        cfg["teacher"] = previous["adv"].checkpoint
    return cfg


def run_pipeline(stages: Sequence[str], configs: Dict[str, Dict[str, Any]], *, root: Optional[str] = None,
                 resume: bool = False, evaluate: bool = True, progress: bool = True,
                 tensorboard: bool = True, log=print) -> List[Dict[str, Any]]:
    """Train ``stages`` in order, each from its config; chain checkpoints (stage-1 -> init of stage 2,
    stage-2 -> teacher of stage 3); evaluate target mIoU and mean CCD after each stage.

    ``root``: stage ``s`` runs in ``<root>/<s>`` (None: each config's own ``output_dir``).
    ``resume``: a stage whose ``last.pth`` already reached ``solver.stop_iter`` is not trained again;
    an unfinished one continues exactly from its ``last.pth``.
    Each stage's mIoU is measured at its own ``input.size_test`` (the official protocol of its config),
    the CCD of every stage at one size, the first stage's ``input.size_test``, so the CCD column
    compares like with like (the official self-distillation config tests at 2048x1024, the others
    at 1024x512).
    Returns one row per stage: stage, checkpoint, miou, ccd_mean, test_size, ccd_size (and the full results).
    """
    ccd_size = list(configs[stages[0]]["input"]["size_test"]) if stages else None
    previous: Dict[str, StageResult] = {}
    rows: List[Dict[str, Any]] = []
    for stage in stages:
        cfg = _chain(stage, configs[stage], previous, root)
        last = latest_checkpoint(cfg["output_dir"]) if resume else None
        result = None
        if last is not None:
            state = load_checkpoint(last)
            if state.get("stage") == stage and int(state["iteration"]) >= cfg["solver"]["stop_iter"]:
                if D.is_main():
                    log(f"[{stage}] already finished at iteration {state['iteration']}: {last}")
                result = StageResult(stage, cfg["output_dir"], last, int(state["iteration"]))
        if result is None:
            result = train_stage(stage, cfg, resume=last, progress=progress, tensorboard=tensorboard)
        previous[stage] = result
        row: Dict[str, Any] = {"stage": stage, "checkpoint": result.checkpoint}
        if evaluate:
            from ..models import load_checkpoint_models

            device = D.resolve_device(cfg["device"])
            features, classifier, _ = load_checkpoint_models(result.checkpoint, device)
            metrics = evaluate_models(features, classifier, cfg, device, progress=progress, ccd_size=ccd_size,
                                      output_dir=os.path.join(cfg["output_dir"], "eval"))
            row.update(metrics)
            if D.is_main():
                from ..evaluation import format_table, write_results_csv

                log(f"[{stage}] target mIoU {100 * row['miou']:.2f} (at {_size(row['test_size'])})  "
                    f"mean CCD {row['ccd_mean']:.4f} (at {_size(row['ccd_size'])})")
                log(format_table(metrics["eval"], metrics["class_names"]))
                write_results_csv(metrics["eval"], metrics["class_names"],
                                  os.path.join(cfg["output_dir"], "eval", "results.csv"))
                if stage == "sd" and target_is_synthetic(cfg) and os.path.isdir(pseudo_label_dir(cfg)):
                    scores = score_pseudo_labels(cfg, pseudo_label_dir(cfg))
                    row["pseudo_label_miou"], row["pseudo_label_allacc"] = float(scores.miou), float(scores.allacc)
                    row["student"] = (f"from {cfg['model']['weights'] or 'random weights (model.weights is empty)'}, "
                                      f"trained {result.iteration} iterations")
                    log(f"[sd] its pseudo labels: mIoU {100 * row['pseudo_label_miou']:.2f} against the "
                        "synthetic target-train labels (which training never reads)")
            del features, classifier
        rows.append(row)
    return rows


def _size(size) -> str:
    return "x".join(str(v) for v in size) if size else "-"


def format_summary(rows: Sequence[Dict[str, Any]]) -> str:
    """The table of target mIoU and mean CCD after each stage, with the input size each was measured at."""
    lines = [f"{'stage':<24} {'target mIoU (%)':>16} {'pixel acc (%)':>14} {'test size':>10} {'mean CCD':>10} "
             f"{'CCD size':>10}", "-" * 89]
    for r in rows:
        miou = f"{100 * r['miou']:.2f}" if "miou" in r else "-"
        acc = f"{100 * r['eval'].allacc:.2f}" if "eval" in r else "-"
        ccd = f"{r['ccd_mean']:.4f}" if "ccd_mean" in r else "-"
        lines.append(f"{STAGE_TITLES.get(r['stage'], r['stage']):<24} {miou:>16} {acc:>14} "
                     f"{_size(r.get('test_size')):>10} {ccd:>10} {_size(r.get('ccd_size')):>10}")
    return "\n".join(lines + _self_distillation_note(rows))


def _self_distillation_note(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """What stage 3 learnt from, when that is known (synthetic data), and what it did to its teacher's
    scores; when mIoU fell, the reason measured on the demo data (its students reproduce their
    teacher's labels on about 91% of the pixels but at about 50% mIoU)."""
    sd = next((r for r in rows if "pseudo_label_miou" in r and "eval" in r), None)
    if sd is None:
        return []
    lines = ["", f"Stage 3: a fresh model, {sd['student']} on its teacher's pseudo labels",
             f"(mIoU {100 * sd['pseudo_label_miou']:.2f}%, pixel acc {100 * sd['pseudo_label_allacc']:.2f}% "
             "against the synthetic target-train labels, which training never reads)."]
    teacher = next((r for r in rows if r["stage"] == "adv" and "eval" in r), None)
    if teacher is None:
        return lines
    d_miou, d_acc = 100 * (sd["miou"] - teacher["miou"]), 100 * (sd["eval"].allacc - teacher["eval"].allacc)
    lines.append(f"On its teacher: target mIoU {d_miou:+.2f} points, pixel acc {d_acc:+.2f} points, "
                 f"mean CCD {sd['ccd_mean'] - teacher['ccd_mean']:+.4f}.")
    if d_miou < 0:
        lines += ["A student from random weights learns the frequent classes of its teacher's labels before the rare",
                  "ones (few pixels, often wrong in the labels), so it loses on mIoU, the mean over classes, first."]
    return lines


def write_summary_csv(rows: Sequence[Dict[str, Any]], path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["stage", "target_miou_percent", "pixel_acc_percent", "test_size", "mean_ccd", "ccd_size",
                    "checkpoint"])
        for r in rows:
            w.writerow([r["stage"], f"{100 * r['miou']:.4f}" if "miou" in r else "",
                        f"{100 * r['eval'].allacc:.4f}" if "eval" in r else "", _size(r.get("test_size")),
                        f"{r['ccd_mean']:.6f}" if "ccd_mean" in r else "", _size(r.get("ccd_size")),
                        r["checkpoint"]])
    return path
