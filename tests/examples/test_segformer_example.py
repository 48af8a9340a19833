"""examples/train_segformer.py: FADA on a Hugging Face SegFormer, a few iterations end to end."""

import math

import pytest

pytest.importorskip("transformers", reason="transformers is not installed (the SegFormer example needs it)")

import train_segformer  # noqa: E402  (examples/ is on sys.path, see conftest.py)


def test_segformer_example_runs_a_few_iterations(tmp_path, capsys):
    rows = train_segformer.main(["--data", str(tmp_path / "synthetic"), "--size", "64", "32",
                                 "--source-iterations", "2", "--adapt-iterations", "2", "--batch-size", "2"])
    assert list(rows) == ["source only", "FADA"]
    for miou, ccd in rows.values():
        assert 0.0 <= miou <= 1.0 and math.isfinite(ccd)
    out = capsys.readouterr().out
    assert "last iteration: seg" in out and "FADA" in out
