"""Training configuration: defaults, YAML files merged over them, dotted command-line overrides.

The structure mirrors the official FADA yacs config (MODEL / INPUT / DATASETS / SOLVER / TEST) in
lower case. A key that does not exist in the defaults is an error naming it (typos in a config file
or on the command line must not be silently ignored). Values are coerced to the default's type, so
``solver.base_lr=5e-4`` works although YAML reads ``5e-4`` as a string.

Overrides: ``section.key=value`` (value parsed as YAML: ``[1024,512]``, ``true``, ``2.5e-4``).
When several stages run (``--stage all``), an override may be prefixed with the stage it is for:
``adv.solver.base_lr=1e-4`` changes only the adversarial stage.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Dict, Iterable, Optional

import yaml

__all__ = ["DEFAULTS", "STAGES", "ConfigError", "default_config", "load_config", "merge", "apply_overrides",
           "parse_override", "to_yaml"]

STAGES = ("src", "adv", "sd")


class ConfigError(KeyError):
    """An unknown key or a value of the wrong type in a config file or override."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


DEFAULTS: Dict[str, Any] = {
    "model": {
        "backbone": "resnet101",      # resnet101 | vgg16 | small
        "num_classes": 19,
        "weights": "",                # local ImageNet weights file ('' = random init)
        "partial_weights": False,     # load only the tensors of `weights` that fit (default: strict)
        "freeze_bn": True,            # FrozenBatchNorm2d in the backbone (official stages 1-2)
        "ndf": 256,                   # discriminator width
    },
    "input": {
        "source_size_train": [1280, 720],   # (W, H) as in the official config
        "target_size_train": [1024, 512],
        "size_test": [1024, 512],
        "scales_train": [1.0, 1.0],         # != (1, 1): random scale + crop instead of resize
        "flip_prob_train": 0.0,
        "brightness": 0.0,                  # colour jitter, applied to the *source* stream only
        "contrast": 0.0,                    # (as the official build_transform)
        "saturation": 0.0,
        "hue": 0.0,
        "pixel_mean": [0.485, 0.456, 0.406],
        "pixel_std": [0.229, 0.224, 0.225],
        "to_bgr255": False,                 # Caffe-style input (official VGG configs)
        "ignore_label": 255,
    },
    "datasets": {
        "source": "gta5",             # gta5 | synthia | cityscapes | pseudo
        "source_root": "",            # '' everywhere = generate and use the synthetic data
        "source_split": "train",
        "source_kwargs": {},          # extra keyword arguments for the source dataset
        "target": "cityscapes",       # cityscapes | crosscity
        "target_root": "",
        "target_split": "train",
        "target_kwargs": {},
        "test": "cityscapes",
        "test_root": "",              # '' = target_root
        "test_split": "val",
        "test_kwargs": {},
        "class_balanced_lists": "auto",  # official class-balanced GTA5/SYNTHIA sampling: auto | <lists file> | none
        "pseudo_label_dir": "",       # stage 3: where pseudo labels are (or will be) written
        "pseudo_label_size": [],      # stage 3: (W, H) the teacher labels at ([] = its own input.size_test)
        "synthetic_dir": "",          # '' = <output_dir>/../synthetic_data when roots are empty
        "synthetic": {"num_source": 24, "num_target_train": 16, "num_target_val": 8,
                      "size": [160, 96], "seed": 0},
    },
    "solver": {
        "max_iter": 16000,            # poly schedule length
        "stop_iter": 10000,           # training stops here (<= max_iter)
        "lr_method": "poly",
        "base_lr": 0.02,
        "base_lr_d": 0.008,
        "lr_power": 0.9,
        "momentum": 0.9,
        "weight_decay": 0.0005,
        "classifier_lr_mult": 10.0,
        "checkpoint_period": 2000,
        "batch_size": 16,             # global; stage 2 splits it half source, half target
        "num_workers": 4,
    },
    "adv": {
        "temperature": 1.8,
        "cap": 0.9,
        "adversarial_weight": 0.001,
        "discriminator_weights": [0.5, 0.5],
    },
    "test": {
        "batch_size": 1,
        "flip": False,
        "scales": [1.0],
        "num_images_to_save": 0,
    },
    "output_dir": "results",
    "seed": 0,
    "deterministic": False,
    "backend": "auto",                # loss backend: auto | kernel | eager
    "amp": "none",                    # none | bf16 | fp16
    "device": "auto",                 # auto | cpu | cuda
    "log_period": 20,
    "init_from": "",                  # stage 2: the stage-1 checkpoint to start from
    "init_discriminator": "auto",     # stage 2: D from init_from too: auto (if it has one) | require | skip
    "teacher": "",                    # stage 3: the stage-2 checkpoint that makes the pseudo labels
}

_CHOICES = {
    "model.backbone": ("resnet101", "vgg16", "small"),
    "backend": ("auto", "kernel", "eager"),
    "amp": ("none", "bf16", "fp16"),
    "init_discriminator": ("auto", "require", "skip"),
    "solver.lr_method": ("poly",),
}


def default_config() -> Dict[str, Any]:
    return copy.deepcopy(DEFAULTS)


def _coerce(key: str, default: Any, value: Any) -> Any:
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key {key!r} expects true/false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, bool):
            raise ConfigError(f"config key {key!r} expects an int, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key {key!r} expects an int, got {value!r}") from None
        if as_float != int(as_float):
            raise ConfigError(f"config key {key!r} expects an int, got {value!r}")
        return int(as_float)
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key {key!r} expects a number, got {value!r}") from None
    if isinstance(default, list):
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, str):
            value = yaml.safe_load(value.replace("(", "[").replace(")", "]"))
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r} expects a list, got {value!r}")
        if default and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in default):
            kind = float if any(isinstance(v, float) for v in default) else int
            try:
                value = [kind(v) if kind is int else float(v) for v in value]
            except (TypeError, ValueError):
                raise ConfigError(f"config key {key!r} expects a list of numbers, got {value!r}") from None
        return value
    if isinstance(default, str):
        if value is None:
            return ""
        return str(value)
    return value


def merge(base: Dict[str, Any], update: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Merge ``update`` into a copy of ``base``; unknown keys raise ConfigError naming them."""
    out = copy.deepcopy(base)
    if not isinstance(update, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'!r} must be a mapping, got {update!r}")
    for key, value in update.items():
        key = str(key).lower()
        full = prefix + key
        if key not in out:
            raise ConfigError(f"unknown config key {full!r}" + _suggest(key, out, prefix))
        default = out[key]
        if isinstance(default, dict) and default:
            out[key] = merge(default, value or {}, full + ".")
        elif isinstance(default, dict):  # an open mapping (e.g. extra dataset kwargs)
            if not isinstance(value, dict):
                raise ConfigError(f"config key {full!r} expects a mapping, got {value!r}")
            out[key] = dict(value)
        else:
            out[key] = _coerce(full, default, value)
        if full in _CHOICES and out[key] not in _CHOICES[full]:
            raise ConfigError(f"config key {full!r} must be one of {_CHOICES[full]}, got {out[key]!r}")
    return out


def _suggest(key: str, section: Dict[str, Any], prefix: str) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(section), n=1)
    return f" (did you mean {prefix + close[0]!r}?)" if close else f" (known keys: {', '.join(sorted(section))})"


def parse_override(text: str) -> tuple:
    """``'solver.base_lr=1e-3'`` -> ``(['solver', 'base_lr'], '1e-3' parsed as YAML)``."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.lower().split("."), value


def apply_overrides(cfg: Dict[str, Any], overrides: Iterable[str], stage: Optional[str] = None) -> Dict[str, Any]:
    """Apply dotted overrides; those prefixed by a stage name apply only to that stage."""
    for text in overrides:
        path, value = parse_override(text)
        if path[0] in STAGES:
            if path[0] != stage:
                continue
            path = path[1:]
            if not path:
                raise ConfigError(f"override {text!r} names a stage but no key")
        nested: Any = value
        for part in reversed(path):
            nested = {part: nested}
        cfg = merge(cfg, nested)
    return cfg


def load_config(path: Optional[str] = None, overrides: Iterable[str] = (), stage: Optional[str] = None) -> Dict[str, Any]:
    """Defaults <- YAML file (optional) <- overrides; validated."""
    cfg = default_config()
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path!r}")
        with open(path, "r", encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
        try:
            cfg = merge(cfg, data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    cfg = apply_overrides(cfg, overrides, stage)
    validate(cfg)
    return cfg


def validate(cfg: Dict[str, Any]) -> None:
    s = cfg["solver"]
    if s["max_iter"] < 1 or s["stop_iter"] < 1:
        raise ConfigError("solver.max_iter and solver.stop_iter must be >= 1")
    if s["stop_iter"] > s["max_iter"]:
        raise ConfigError(f"solver.stop_iter ({s['stop_iter']}) must not exceed solver.max_iter ({s['max_iter']})")
    if s["batch_size"] < 1:
        raise ConfigError("solver.batch_size must be >= 1")
    if s["checkpoint_period"] < 1:
        raise ConfigError("solver.checkpoint_period must be >= 1")
    for key in ("source_size_train", "target_size_train", "size_test"):
        if len(cfg["input"][key]) != 2:
            raise ConfigError(f"input.{key} must be [W, H], got {cfg['input'][key]!r}")
    if len(cfg["datasets"]["pseudo_label_size"]) not in (0, 2):
        raise ConfigError("datasets.pseudo_label_size must be [W, H] or [] (the teacher's size), "
                          f"got {cfg['datasets']['pseudo_label_size']!r}")


def to_yaml(cfg: Dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)
