"""Every shipped arms file (bench/arms/*.yaml) resolves through the config resolver (issue 21), and so does
every plan kept beside a committed result (bench/results/*/plan*.yaml: the subset or resolved plans those tables
were scored with), so that each table can be re-scored from what the repository holds.

A recipe now holds only what its strategy reads, so an arm that, say, switched the probe recipe to
fine-tuning by ``--set strategy=finetune`` would be refused; these tests keep every shipped plan loadable
and check that each arm gets the settings it names.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from cxrvit.experiments.arms import pretrain_config
from cxrvit.experiments.plan import arm_config, load_plan
from cxrvit.ssl.config import load_pretrain_recipe
from cxrvit.training.config import (apply_overrides, config_from_dict, config_to_dict, read_by_strategy,
                                    unread_keys)

REPO = Path(__file__).resolve().parents[2]
ARMS_FILES = sorted((REPO / "bench" / "arms").glob("*.yaml")) + sorted((REPO / "bench" / "results").glob("*/plan*.yaml"))
IDS = [str(p.relative_to(REPO / "bench")) for p in ARMS_FILES]
OLD_IMPROVED = REPO / "tests" / "fixtures" / "configs" / "improved-saved-before-issue21.yaml"


def _value(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


@pytest.mark.parametrize("path", ARMS_FILES, ids=IDS)
def test_every_arm_of_a_shipped_plan_resolves_with_the_settings_it_names(path):
    plan = load_plan(path)
    assert plan.arms
    for arm in plan.arms:
        for seed in plan.seeds:
            cfg = arm_config(plan, arm, seed)      # raises if a key is unknown, bad or unread by the strategy
            d = config_to_dict(cfg)
            assert cfg.engine.seed == seed
            for item in arm.overrides:             # the arm's own settings all land
                key, value = item.split("=", 1)
                assert _value(config_to_dict(load_recipe_value(key, value)), key) == _value(d, key), (arm.name, item)
            for item in plan.overrides:            # the plan's shared ones land where the strategy reads them
                key, value = item.split("=", 1)
                own = any(o.split("=", 1)[0] == key for o in arm.overrides)
                if not own and not unread_keys(cfg.strategy, [key]):
                    assert _value(config_to_dict(load_recipe_value(key, value)), key) == _value(d, key), (arm.name, item)


def load_recipe_value(key: str, value: str):
    """A default config with just ``key=value`` applied: the value as the resolver parses and types it."""
    return config_from_dict(apply_overrides({"strategy": "lp_ft"}, [f"{key}={value}"]))


def test_round_one_and_issue_20_fine_tune_arms_keep_their_settings():
    old = yaml.safe_load(OLD_IMPROVED.read_text())   # `improved` before its probe and fine-tune halves split
    # round 1's "improved" fine-tune arm was `improved + strategy=finetune, model.pos_embed=random`
    plan = load_plan(REPO / "bench" / "arms" / "sample-cv2.yaml")
    before = config_from_dict(apply_overrides(old, ["strategy=finetune", "model.pos_embed=random",
                                                    *plan.overrides, "engine.seed=0"]))
    for name in ("improved", "mae+improved"):
        now = arm_config(plan, plan.arm(name), 0)
        assert dict(read_by_strategy(now), name="improved") == read_by_strategy(before), name
    # issue 20's mae-ft was `improved + strategy=finetune, layer decay 0.55, drop-path 0.2, plain BCE` (the
    # scaling plan keeps it; the 3-seed plan dropped it after seed 0 for mae-lpft, the same with strategy=lp_ft)
    plan = load_plan(REPO / "bench" / "arms" / "sample-cv2-scaling.yaml")
    before = config_from_dict(apply_overrides(old, ["strategy=finetune", "optim.layer_decay=0.55",
                                                    "model.drop_path=0.2", "loss.kind=bce", *plan.overrides,
                                                    "engine.seed=0"]))
    now = arm_config(plan, plan.arm("mae-ft"), 0)
    assert dict(read_by_strategy(now), name="improved") == read_by_strategy(before)
    assert now.schedule.epochs == 30                  # the plan's budget, not the recipe's 75
    learned = load_plan(REPO / "bench" / "arms" / "sample-cv2-learned.yaml")
    lpft = arm_config(learned, learned.arm("mae-lpft"), 0)
    lpft_reads = read_by_strategy(lpft)
    assert lpft_reads.pop("probe") == {"c_grid": [0.01, 0.1, 1.0], "cv_folds": 5, "views": 1}   # its first stage
    assert lpft_reads == dict(read_by_strategy(now), strategy="lp_ft")
    for p in (plan, learned):
        probe = arm_config(p, p.arm("probe-random"), 0)
        assert (probe.name, probe.strategy, probe.model.img_size) == ("probe-random", "linear_probe", 224)



def test_the_shipped_mae224_recipe_is_the_stage_that_won_the_cv():
    """`cxrvit pretrain --recipe mae224` (the product's pre-training) resolves to exactly the CV plan's
    `mae224` stage: the backbone users make is the one the table measured, up to the recipe's name."""
    learned = load_plan(REPO / "bench" / "arms" / "sample-cv2-learned.yaml")
    shipped = dataclasses.asdict(load_pretrain_recipe("mae224", method="mae"))
    stage = dataclasses.asdict(pretrain_config(learned.pretrain["mae224"], None))
    assert (shipped.pop("name"), stage.pop("name")) == ("mae224", "mae-small")
    assert shipped == stage


@pytest.mark.parametrize("path", ARMS_FILES, ids=IDS)
def test_every_pretraining_stage_of_a_shipped_plan_resolves_with_its_overrides(path):
    plan = load_plan(path)
    for name, spec in plan.pretrain.items():
        cfg = dataclasses.asdict(pretrain_config(spec, None))     # raises on an unknown key or a bad value
        assert cfg["method"] == spec.method, name
        for item in spec.overrides:
            key, value = item.split("=", 1)
            got = _value(cfg, key)
            assert (list(got) if isinstance(got, tuple) else got) == yaml.safe_load(value), (name, item)
