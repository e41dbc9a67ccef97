"""Reading an arms file (``experiments/plan.py``): every malformed file is an error naming it and the problem."""
import pytest

from cxrvit.experiments.plan import load_plan


def test_an_arms_file_that_is_not_utf8_text_names_the_file(tmp_path):
    path = tmp_path / "arms.yaml"
    path.write_text("arms: []\n", encoding="utf-16")  # e.g. saved by a Windows editor
    with pytest.raises(ValueError, match="cannot read the arms file") as exc:
        load_plan(path)
    assert str(path) in str(exc.value)
