"""The README's quick start and model recipes run as written, and CI runs exactly the README's test command."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _block_after(heading: str, lang: str) -> str:
    section = README.split(heading, 1)[1]
    return re.search(rf"```{lang}\n(.*?)```", section, re.S).group(1)


def test_quick_start_runs(capsys):
    code = _block_after("## Quick start", "python")
    exec(compile(code, "README quick start", "exec"), {})
    assert "seg+adv loss" in capsys.readouterr().out


def test_ci_runs_the_readme_test_command():
    command = _block_after("## Tests", "bash").strip().split("&&")[-1].strip()
    assert command in (ROOT / ".ci" / "run").read_text()


def _section(heading: str) -> str:
    return README.split(heading, 1)[1].split("\n## ", 1)[0]


RECIPES = re.findall(r"```python\n(.*?)```", _section("## Models from torchvision, smp and Hugging Face"), re.S)
OPTIONAL = {"torchvision", "segmentation_models_pytorch", "transformers", "matplotlib"}


FAMILIES = ("TorchvisionAdapter", "SMPAdapter", "SegformerAdapter", "HookAdapter", "plot")


@pytest.mark.parametrize("code", RECIPES, ids=[next(f for f in FAMILIES if f in c) for c in RECIPES])
def test_recipe_runs(code):
    """Every recipe of the models section runs as written (skipped when its model library is absent)."""
    try:
        exec(compile(code, "README recipe", "exec"), {})
    except ModuleNotFoundError as exc:
        if exc.name not in OPTIONAL:
            raise
        pytest.skip(f"{exc.name} is not installed")


def test_every_family_has_a_recipe():
    assert len(RECIPES) == len(FAMILIES)
    for family in FAMILIES[:-1]:
        assert sum(family in code for code in RECIPES) == 1, family
