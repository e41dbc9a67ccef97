"""Reading an arms file (``experiments/plan.py``): every malformed file is an error naming it and the problem."""
import pytest
import yaml

from cxrvit.experiments.plan import Arm, ArmsPlan, check_plan, load_plan


def test_an_arms_file_that_is_not_utf8_text_names_the_file(tmp_path):
    path = tmp_path / "arms.yaml"
    path.write_text("arms: []\n", encoding="utf-16")  # e.g. saved by a Windows editor
    with pytest.raises(ValueError, match="cannot read the arms file") as exc:
        load_plan(path)
    assert str(path) in str(exc.value)


ARMS = [{"name": "a", "recipe": "baseline"}, {"name": "b", "recipe": "probe-random"}]


@pytest.mark.parametrize("text, message", [
    ("- {name: a, recipe: baseline}\n", "an arms file is a mapping"),       # the arms list alone, no 'arms:' key
    ("just a sentence\n", "an arms file is a mapping"),                      # was: unknown keys [' ', 'a', 'c', ...]
], ids=["list", "scalar"])
def test_an_arms_file_that_is_not_a_mapping_names_the_file(tmp_path, text, message):
    path = tmp_path / "arms.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as exc:
        load_plan(path)
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("body, message", [
    ({"pretrain": ["mae"]}, "'pretrain' must map"),
    ({"arms": [{"name": 3, "recipe": "baseline"}, ARMS[1]], "reference": "b"}, "name and recipe must be text"),
    ({"arms": [{"name": "a", "recipe": 3}, ARMS[1]]}, "name and recipe must be text"),
    ({"arms": [{"name": "a", "recipe": "baseline", "init": 3}, ARMS[1]]}, "init must be a file path"),
    ({"arms": [{"name": "a", "recipe": "baseline", "overrides": "optim.lr=1e-3"}, ARMS[1]]},
     "overrides must be a list of 'key=value'"),
    ({"arms": [{"name": "a", "recipe": "baseline", "overrides": [3]}, ARMS[1]]}, "overrides must be a list"),
    ({"overrides": "schedule.epochs=1"}, "overrides must be a list"),
    ({"pretrain": {"mae": {"method": "mae", "overrides": "x=1"}}}, "overrides must be a list"),
    ({"pretrain": {"mae": {"method": 3}}}, "method and recipe must be text"),
    ({"folds": "two"}, "'folds' must be an integer, got 'two'"),
    ({"folds": 2.5}, "'folds' must be an integer, got 2.5"),
    ({"fold_seed": "x"}, "'fold_seed' must be an integer, got 'x'"),
    ({"run_folds": "0"}, "'run_folds' must be a list of fold numbers"),
    # these five were refused only when the harness planned the folds, in a message that named no file
    ({"protocol": "nope"}, "unknown protocol 'nope'; choose auto, cv, official"),
    ({"folds": 1}, "'folds' must be at least 2"),
    ({"folds": 2, "run_folds": [7]}, r"run_folds \[7\] must be distinct fold numbers in 0..1"),
    ({"run_folds": [0, 0]}, "must be distinct fold numbers"),
    ({"run_folds": []}, "must be distinct fold numbers"),
], ids=["pretrain-list", "name-int", "recipe-int", "init-int", "overrides-str", "override-int", "plan-overrides-str",
        "stage-overrides-str", "method-int", "folds-str", "folds-float", "fold-seed-str", "run-folds-str",
        "protocol", "one-fold", "fold-out-of-range", "fold-twice", "no-fold"])
def test_wrong_values_in_an_arms_file_name_the_file_and_the_key(tmp_path, body, message):
    # the first thirteen ended in a Python traceback (TypeError, AttributeError), some only after the folds were planned
    path = tmp_path / "arms.yaml"
    path.write_text(yaml.safe_dump({"reference": "a", "arms": ARMS, **body}))
    with pytest.raises(ValueError, match=message) as exc:
        load_plan(path)
    assert str(path) in str(exc.value)


def test_a_key_given_twice_in_an_arms_file_is_an_error(tmp_path):
    path = tmp_path / "arms.yaml"
    path.write_text(yaml.safe_dump({"reference": "a", "arms": ARMS}) + "arms: []\n")  # the last one used to win
    with pytest.raises(ValueError, match="'arms' appears twice") as exc:
        load_plan(path)
    assert str(path) in str(exc.value)


def test_the_official_protocol_ignores_folds():
    plan = check_plan(ArmsPlan(arms=[Arm(**a) for a in ARMS], reference="a", protocol="official", folds=1,
                               run_folds=[0]), "plan")
    assert plan.protocol == "official"
