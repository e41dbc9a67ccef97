"""Recipes say what they do (issue 21): a key the strategy does not read is an error; saved configs still load."""
from pathlib import Path

import pytest
import torch
import yaml

from cxrvit.training.config import (RECIPES, UNREAD, config_from_dict, config_to_dict, load_recipe,
                                    read_by_strategy, recipe_path)

REPO = Path(__file__).resolve().parents[2]
OLD_SAVED = REPO / "tests" / "fixtures" / "configs" / "improved-saved-before-issue21.yaml"


def _old_saved() -> dict:
    return yaml.safe_load(OLD_SAVED.read_text())


@pytest.mark.parametrize("recipe, override, message", [
    ("probe-random", "optim.lr=1e-3", r"--set optim.lr=\.\.\. is not read by strategy linear_probe"),
    ("probe-random", "schedule.epochs=5", r"schedule.epochs=\.\.\. is not read by strategy linear_probe"),
    ("probe-random", "model.drop_path=0.1", r"model.drop_path=\.\.\. is not read by strategy linear_probe"),
    ("probe-random", "augment.mix_prob=0.5", r"augment.mix_prob=\.\.\. is not read by strategy linear_probe"),
    ("improved", "ema.enabled=true", r"ema.enabled=\.\.\. is not read by strategy linear_probe"),
    ("finetune", "probe.views=4", r"probe.views=\.\.\. is not read by strategy finetune"),
    ("baseline", "probe.c_grid=[1.0]", r"probe.c_grid=\.\.\. is not read by strategy finetune"),
])
def test_an_override_the_strategy_does_not_read_names_key_and_strategy(recipe, override, message):
    with pytest.raises(ValueError, match=message):
        load_recipe(recipe, [override])


@pytest.mark.parametrize("recipe, override, key, strategy", [
    ("baseline", "strategy=linear_probe", "optim", "linear_probe"),    # baseline.yaml's sections fine-tune
    ("finetune", "strategy=linear_probe", "optim", "linear_probe"),
    ("improved", "strategy=finetune", "probe", "finetune"),            # the probe recipe is not a fine-tune recipe
    ("probe-random", "strategy=finetune", "probe", "finetune"),
])
def test_a_recipe_section_the_strategy_does_not_read_names_file_section_and_strategy(recipe, override, key,
                                                                                       strategy):
    with pytest.raises(ValueError, match=rf"recipes/\S+\.yaml\)?: (\S+, )*{key}\b.* not read by strategy {strategy} "):
        load_recipe(recipe, [override])


@pytest.mark.parametrize("text, named", [("model:\n  drop_path: 0.1\n", "model.drop_path"),
                                         ("loss:\n  kind: asl\n", "loss")])
def test_a_user_recipe_file_is_checked_the_same_way(tmp_path, text, named):
    path = tmp_path / "mine.yaml"
    path.write_text("strategy: linear_probe\n" + text)
    with pytest.raises(ValueError, match=rf"mine.yaml: {named} is not read by strategy linear_probe"):
        load_recipe(path)


def test_lp_ft_reads_every_section():
    # lp_ft runs a probe and then the fine-tuning loop: it reads every section
    assert load_recipe("finetune", ["strategy=lp_ft", "probe.views=2"]).probe.views == 2
    assert load_recipe("baseline", ["strategy=lp_ft"]).strategy == "lp_ft"


def test_shipped_recipes_hold_only_what_their_strategy_reads():
    for name in RECIPES:
        cfg = load_recipe(name)   # would raise if the file held an unread key
        raw = yaml.safe_load(recipe_path(name).read_text())
        sections = set(raw) - {"name", "strategy", "base"}
        assert not sections & set(UNREAD[cfg.strategy]), name


def test_shared_overrides_skip_a_recipe_that_does_not_read_them():
    shared = ["model.img_size=128", "schedule.epochs=20"]   # an arms plan's, for a probe arm and a fine-tune arm
    probe = load_recipe("probe-random", ["model.img_size=224"], shared=shared)
    assert probe.model.img_size == 224 and probe.schedule.epochs == load_recipe("probe-random").schedule.epochs
    ft = load_recipe("finetune", [], shared=shared)
    assert (ft.model.img_size, ft.schedule.epochs) == (128, 20)
    # the arm's own overrides decide the strategy the shared ones are checked against
    assert load_recipe("improved", ["strategy=lp_ft"], shared=shared).schedule.epochs == 20


def test_improved_is_probe_random_on_the_shipped_learned_backbone_read_at_the_patch_mean():
    """Issue 20: `improved` = probe-random's probe, started from the shipped MAE backbone, mean-pool read-out."""
    imp, probe = load_recipe("improved"), load_recipe("probe-random")
    shipped = "sample/backbones/vit_small-mae224-nih-sample.safetensors"
    expected = config_to_dict(probe)
    expected["model"].update(global_pool="avg", init=shipped)
    assert config_to_dict(imp) == dict(expected, name="improved")
    assert (REPO / shipped).is_file()     # the file ships with the repository (sample/README.md)


def test_probe_random_reads_what_improved_read_before_issue_21():
    # everything the linear probe reads is as it was; only sections it never read went back to defaults
    assert read_by_strategy(load_recipe("probe-random")) == dict(read_by_strategy(config_from_dict(_old_saved())),
                                                                  name="probe-random")
    assert config_to_dict(load_recipe("probe-random"))["augment"] == _old_saved()["augment"]   # feature-cache key


def test_a_base_recipe_is_merged_under_the_file(tmp_path):
    (tmp_path / "mine.yaml").write_text("base: finetune\nname: mine\noptim:\n  lr: 1.0e-4\n")
    cfg = load_recipe(tmp_path / "mine.yaml")
    assert cfg.name == "mine" and cfg.optim.lr == 1e-4 and cfg.optim.layer_decay == 0.55
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ValueError, match="base recipes form a loop"):
        load_recipe(tmp_path / "loop.yaml")


def test_a_config_saved_before_issue_21_still_loads(tmp_path):
    old = _old_saved()
    assert old["strategy"] == "linear_probe" and "optim" in old and "workers" in old["engine"]
    cfg = config_from_dict(old, source=str(OLD_SAVED))    # saved configs hold every section: no strategy check
    assert cfg.loss.kind == "asl" and cfg.model.drop_path == 0.1
    assert not hasattr(cfg.engine, "workers")             # the retired key is dropped on load ...
    with pytest.raises(ValueError, match="unknown config key 'engine.workers'"):
        load_recipe("baseline", ["engine.workers=2"])     # ... and refused when asked for


def test_a_bundle_with_an_old_full_config_loads_and_predicts(tmp_path):
    from cxrvit.data.preprocess import Preprocessing
    from cxrvit.inference.bundle import load_bundle, save_bundle
    from cxrvit.model.vit import vit_tiny

    old = _old_saved()
    labels = old["data"]["labels"]
    torch.manual_seed(0)
    save_bundle(tmp_path / "b", vit_tiny(num_classes=len(labels)), labels, {k: 0.5 for k in labels},
                Preprocessing(size=32), arch="vit_tiny", config=old, extra={"training": {"strategy": "linear_probe"}})
    bundle = load_bundle(tmp_path / "b")
    assert bundle.config == old and config_from_dict(bundle.config).strategy == "linear_probe"
    probs = bundle.predict_proba(torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8))
    assert probs.shape == (2, len(labels)) and bool(((probs > 0) & (probs < 1)).all())
