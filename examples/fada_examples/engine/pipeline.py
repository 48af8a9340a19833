"""Running several stages in sequence (``--stage all``) and the summary table."""
from __future__ import annotations

import csv
import os
from typing import Any, Dict, List, Optional, Sequence


from . import distributed as D
from .checkpoint import latest_checkpoint, load_checkpoint
from .trainer import StageResult, evaluate_models, resolve_device, train_stage

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
    Returns one row per stage: stage, checkpoint, miou, ccd_mean (and the full results).
    """
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

            device = resolve_device(cfg)
            features, classifier, _ = load_checkpoint_models(result.checkpoint, device)
            metrics = evaluate_models(features, classifier, cfg, device,
                                      output_dir=os.path.join(cfg["output_dir"], "eval"), progress=progress)
            row.update(metrics)
            if D.is_main():
                from ..evaluation import format_table, write_results_csv

                log(f"[{stage}] target mIoU {100 * row['miou']:.2f}  mean CCD {row['ccd_mean']:.4f}")
                log(format_table(metrics["eval"], metrics["class_names"]))
                write_results_csv(metrics["eval"], metrics["class_names"],
                                  os.path.join(cfg["output_dir"], "eval", "results.csv"))
            del features, classifier
        rows.append(row)
    return rows


def format_summary(rows: Sequence[Dict[str, Any]]) -> str:
    """The table of target mIoU and mean CCD after each stage."""
    lines = [f"{'stage':<24} {'target mIoU (%)':>16} {'mean CCD':>10}", "-" * 52]
    for r in rows:
        miou = f"{100 * r['miou']:.2f}" if "miou" in r else "-"
        ccd = f"{r['ccd_mean']:.4f}" if "ccd_mean" in r else "-"
        lines.append(f"{STAGE_TITLES.get(r['stage'], r['stage']):<24} {miou:>16} {ccd:>10}")
    return "\n".join(lines)


def write_summary_csv(rows: Sequence[Dict[str, Any]], path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["stage", "target_miou_percent", "mean_ccd", "checkpoint"])
        for r in rows:
            w.writerow([r["stage"], f"{100 * r['miou']:.4f}" if "miou" in r else "",
                        f"{r['ccd_mean']:.6f}" if "ccd_mean" in r else "", r["checkpoint"]])
    return path
