#!/usr/bin/env python
"""Train FADA (GTA5 -> Cityscapes and the other official settings) with fada_core.

Stages: ``src`` (source only), ``adv`` (fine-grained adversarial), ``sd`` (self-distillation:
pseudo labels from the stage-2 model, a fresh model trained on them), ``all`` (the three in
sequence, each followed by target evaluation and class-center-distance analysis, ending with a
table of target mIoU and mean CCD per stage).

With no data root, synthetic GTA5/Cityscapes-like data is generated once and the small backbone
runs everything on the CPU in a few minutes:

    python examples/train_gta2city.py                      # = --stage all on synthetic data

With the real data (one stage at a time, official configs):

    python examples/train_gta2city.py --stage src --config examples/configs/deeplabv2_r101_src.yaml \\
        datasets.source_root=/data/GTA5 datasets.target_root=/data/cityscapes \\
        model.weights=/weights/resnet101-5d3b4d8f.pth output_dir=results/src

Multi-GPU: ``torchrun --nproc_per_node=4 examples/train_gta2city.py ...`` (DDP; gloo on the CPU).
Overrides are ``section.key=value``; with ``--stage all`` an override prefixed by a stage
(``adv.solver.base_lr=1e-4``) applies to that stage only.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIGS = {s: os.path.join(HERE, "configs", f"synthetic_small_{s}.yaml") for s in ("src", "adv", "sd")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--stage", choices=("src", "adv", "sd", "all"), default="all")
    p.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="config file; with --stage all give one per stage (src, adv, sd) or one for all "
                        "(default: the synthetic small-backbone configs)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue exactly from a checkpoint (default: <output_dir>/last.pth; with --stage all "
                        "every stage resumes from its own last.pth and finished stages are skipped)")
    p.add_argument("--init", default=None, metavar="CKPT", help="stage adv: the stage-1 checkpoint to start from")
    p.add_argument("--init-discriminator", choices=("auto", "require", "skip"), default=None,
                   help="stage adv: load the discriminator from --init too (an official adversarial checkpoint's "
                        "model_D): auto = when it has one (default), require = error if it has none, skip = never")
    p.add_argument("--teacher", default=None, metavar="CKPT",
                   help="stage sd: the stage-2 checkpoint whose argmax predictions become the pseudo labels")
    p.add_argument("--backend", choices=("auto", "kernel", "eager"), default=None, help="fada_core loss backend")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default=None, help="mixed precision")
    p.add_argument("--output-dir", default=None, help="output folder (stage all: one sub-folder per stage)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda")
    p.add_argument("--no-eval", action="store_true", help="skip evaluation / CCD analysis after each stage")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--print-config", action="store_true", help="print the merged config(s) and exit")
    p.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    return p.parse_args(argv)


def build_configs(args):
    from fada_examples.config import load_config

    stages = ("src", "adv", "sd") if args.stage == "all" else (args.stage,)
    files = list(args.config)
    if not files:
        if args.stage != "all" and len(stages) == 1:
            files = [DEFAULT_CONFIGS[args.stage]]
        else:
            files = [DEFAULT_CONFIGS[s] for s in stages]
    if len(files) == 1:
        files = files * len(stages)
    if len(files) != len(stages):
        raise SystemExit(f"--stage {args.stage} needs 1 or {len(stages)} --config files, got {len(files)}")
    extra = []
    for key, value in (("backend", args.backend), ("amp", args.amp), ("device", args.device)):
        if value is not None:
            extra.append(f"{key}={value}")
    for key, value in (("init_from", args.init), ("init_discriminator", args.init_discriminator)):
        if value:
            extra.append(f"adv.{key}={value}" if args.stage == "all" else f"{key}={value}")
    if args.teacher:
        extra.append(f"sd.teacher={args.teacher}" if args.stage == "all" else f"teacher={args.teacher}")
    cfgs = {}
    for stage, path in zip(stages, files):
        cfg = load_config(path, list(args.overrides) + extra, stage=stage)
        if args.output_dir and args.stage != "all":
            cfg["output_dir"] = args.output_dir
        cfgs[stage] = cfg
    return stages, cfgs


def main(argv=None) -> int:
    args = parse_args(argv)
    from fada_examples.config import to_yaml

    stages, cfgs = build_configs(args)
    if args.print_config:
        for stage in stages:
            print(f"# ---- stage {stage}\n{to_yaml(cfgs[stage])}")
        return 0

    from fada_examples.engine import distributed as D
    from fada_examples.engine import format_summary, prepare_data, run_pipeline, train_stage
    from fada_examples.engine.pipeline import write_summary_csv

    first = cfgs[stages[0]]
    D.setup_device(first["device"])
    try:
        if args.stage == "all":
            root = args.output_dir or os.path.dirname(os.path.abspath(first["output_dir"]))
            for s in stages:
                cfgs[s]["output_dir"] = os.path.join(root, s)
                cfgs[s] = prepare_data(cfgs[s])
            rows = run_pipeline(stages, cfgs, root=root, resume=args.resume is not None,
                                evaluate=not args.no_eval, progress=not args.no_progress)
            if D.is_main():
                print("\n" + format_summary(rows))
                if not args.no_eval:
                    print(f"\nsummary: {write_summary_csv(rows, os.path.join(root, 'summary.csv'))}")
        else:
            stage = stages[0]
            cfg = prepare_data(cfgs[stage])
            result = train_stage(stage, cfg, resume=args.resume, progress=not args.no_progress)
            if D.is_main():
                print(f"final checkpoint: {result.checkpoint}")
            if not args.no_eval:
                rows = run_pipeline([stage], {stage: cfg}, resume=True, evaluate=True,
                                    progress=not args.no_progress)
                if D.is_main():
                    print("\n" + format_summary(rows))
    finally:
        D.cleanup()
    return 0


def cli() -> int:
    from fada_examples.config import ConfigError

    try:
        return main()
    except (ConfigError, FileNotFoundError) as exc:  # user errors: the message names the key or path
        print(f"{os.path.basename(__file__)}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
