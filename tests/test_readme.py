"""The README's quick start runs as written, and CI runs exactly the README's test command."""

import pathlib
import re

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
