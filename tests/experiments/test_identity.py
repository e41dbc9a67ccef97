"""An arm's identity: its resolved config with defaults left out, so an additive field keeps finished results."""
import dataclasses
import hashlib
import json

import pytest

from cxrvit.experiments.identity import (LATER_KEYS, config_hash, config_identity, differing_keys, hash_matches,
                                         legacy_config_hash, strip_defaults, upgrade_identity)
from cxrvit.training.config import ModelConfig, TrainConfig, config_to_dict, load_recipe


def test_a_field_added_with_its_default_keeps_the_identity():
    cfg = load_recipe("baseline", ["model.img_size=128", "optim.lr=1e-4"])

    # The config a later version would have: one more field at the top and one in a section, both at defaults.
    @dataclasses.dataclass
    class LaterModel(ModelConfig):
        register_tokens: int = 0

    @dataclasses.dataclass
    class LaterTrain(TrainConfig):
        model: LaterModel = dataclasses.field(default_factory=LaterModel)
        curriculum: str = "none"

    later = LaterTrain(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "model"},
                       model=LaterModel(**dataclasses.asdict(cfg.model)))
    assert config_identity(later) == config_identity(cfg)
    assert config_hash(later) == config_hash(cfg)
    # Used, the new field changes the identity like any other key.
    later.model.register_tokens = 4
    assert config_hash(later) != config_hash(cfg)
    assert differing_keys(config_identity(cfg), config_identity(later)) == ["model.register_tokens: '<default>' -> 4"]


def test_a_changed_value_changes_the_identity_and_names_the_key():
    a = load_recipe("baseline", ["model.img_size=128"])
    b = load_recipe("baseline", ["model.img_size=128", "optim.lr=1e-5"])
    assert config_hash(a) != config_hash(b)
    assert differing_keys(config_identity(a), config_identity(b)) == [f"optim.lr: {a.optim.lr!r} -> 1e-05"]
    # Restating a value the recipe already has, or a default, changes nothing.
    same = load_recipe("baseline", ["model.img_size=128", f"optim.lr={a.optim.lr}", "model.attention=auto"])
    assert config_hash(same) == config_hash(a)


def test_comments_and_key_order_in_the_recipe_keep_the_identity(tmp_path):
    import yaml

    from cxrvit.training.config import recipe_path

    raw = yaml.safe_load(recipe_path("baseline").read_text())
    shuffled = tmp_path / "baseline.yaml"
    shuffled.write_text("# a comment that was not there\n" + yaml.safe_dump(dict(reversed(list(raw.items())))))
    assert config_identity(load_recipe(str(shuffled))) == config_identity(load_recipe("baseline"))


def test_defaults_are_left_out_recursively():
    assert strip_defaults({"a": 1, "s": {"x": 2, "y": 3}, "t": {"z": 0}}, {"a": 1, "s": {"x": 2, "y": 0}, "t": {"z": 0}}) \
        == {"s": {"y": 3}}
    ident = config_identity(TrainConfig())
    assert ident == {}
    # a tuple and a list of the same values are one identity (YAML and JSON have only lists)
    cfg = TrainConfig()
    cfg.augment.scale = tuple(cfg.augment.scale)
    assert config_identity(cfg) == {}


def test_predictions_hashed_before_identities_still_match():
    """Held-out predictions written with the hash of every field (minus the later keys at their defaults)
    are read as the same config; a later key in use still changes that hash."""
    cfg = load_recipe("baseline", ["model.img_size=128"])
    legacy = config_to_dict(cfg)          # the dict as it was before the later keys were added
    del legacy["model"]["attention"], legacy["model"]["pos_embed"], legacy["model"]["global_pool"]
    del legacy["model"]["n_last_blocks"], legacy["model"]["init"], legacy["strategy"], legacy["probe"]
    legacy["engine"]["workers"] = 0       # a field it held then, removed since (issue 21): hashed as it was
    assert set(LATER_KEYS) == {"model.attention", "model.pos_embed", "model.global_pool", "model.n_last_blocks",
                               "model.init", "strategy", "probe"}
    old = hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:16]
    assert legacy_config_hash(cfg) == old and hash_matches(old, cfg) and hash_matches(config_hash(cfg), cfg)
    # (strategy lp_ft reads the fine-tuning sections and the probe's alike: baseline.yaml takes it, issue 21)
    for override in ("strategy=lp_ft", "model.attention=explicit", "model.pos_embed=sincos", "model.global_pool=avg",
                     "model.n_last_blocks=4", "model.init=backbone.safetensors"):
        other = load_recipe("baseline", ["model.img_size=128", override])
        assert legacy_config_hash(other) != old and config_hash(other) != config_hash(cfg)
        assert not hash_matches(old, other)
    lp_ft = load_recipe("baseline", ["model.img_size=128", "strategy=lp_ft"])
    views = load_recipe("baseline", ["model.img_size=128", "strategy=lp_ft", "probe.views=2"])
    assert legacy_config_hash(views) != legacy_config_hash(lp_ft) and config_hash(views) != config_hash(lp_ft)


@pytest.mark.parametrize("method", ["dino", "mae"])
def test_a_pretraining_stage_is_identified_the_same_way(method):
    from cxrvit.ssl.config import load_pretrain_recipe

    a = load_pretrain_recipe(method, ["schedule.epochs=3"], method=method)
    assert config_identity(a)["schedule"]["epochs"] == 3
    assert config_identity(load_pretrain_recipe(method, ["schedule.epochs=3", "engine.seed=0"], method=method)) \
        == config_identity(a)


def test_a_pretraining_is_identified_by_what_changes_its_backbone():
    """Name, device, logging, checkpoint interval and the monitor do not change the backbone a stage writes,
    so they are not its identity; how far it runs (schedule.max_steps) does. An identity recorded under the
    earlier rule (every non-default field) is read as today's."""
    from cxrvit.experiments.identity import field_identity, upgrade_pretrain_identity
    from cxrvit.ssl.config import load_pretrain_recipe

    plain = load_pretrain_recipe("mae-small", ["schedule.epochs=240"], method="mae")
    watched = load_pretrain_recipe("mae-small", ["schedule.epochs=240", "probe.every_epochs=7", "probe.k=5",
                                                 "engine.log_every=3", "engine.checkpoint_every=9",
                                                 "engine.device=cpu"], method="mae")
    assert config_identity(watched) == config_identity(plain) and "probe" not in config_identity(plain)
    assert "name" not in config_identity(plain)
    stopped = load_pretrain_recipe("mae-small", ["schedule.epochs=240", "schedule.max_steps=10"], method="mae")
    assert config_identity(stopped) != config_identity(plain)
    assert upgrade_pretrain_identity(field_identity(watched)) == config_identity(plain)
    assert upgrade_pretrain_identity(config_identity(plain)) == config_identity(plain)


def test_the_legacy_hash_survives_the_removal_of_a_field_nothing_read():
    """engine.workers (read by nothing) left TrainConfig (issue 21); a config saved while it existed still
    hashes as its predictions were hashed then."""
    from pathlib import Path

    import yaml

    from cxrvit.training.config import TrainConfig, config_from_dict

    saved_file = Path(__file__).resolve().parents[1] / "fixtures" / "configs" / "improved-saved-before-issue21.yaml"
    saved = yaml.safe_load(saved_file.read_text())       # every field as written then, engine.workers included
    assert saved["engine"]["workers"] == 0 and "workers" not in config_to_dict(TrainConfig())["engine"]
    legacy, default = json.loads(json.dumps(saved)), config_to_dict(TrainConfig())
    for dotted in LATER_KEYS:                            # the old hash's own rule for keys added later
        *parents, leaf = dotted.split(".")
        here, there = legacy, default
        for part in parents:
            here, there = here[part], there[part]
        if here.get(leaf) == there[leaf]:
            del here[leaf]
    then = hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:16]
    assert legacy_config_hash(config_from_dict(saved)) == then and hash_matches(then, config_from_dict(saved))


def test_only_what_the_strategy_reads_and_not_the_recipe_name_identify_an_arm():
    """A recipe that is probe-random under another name trains the same probe; fine-tuning settings given to a
    probe through a CV plan's shared overrides are not read by it, so they do not make it another arm."""
    probe, improved = load_recipe("probe-random"), load_recipe("probe-random", ["name=improved"])
    assert probe.name != improved.name and config_hash(probe) == config_hash(improved)
    shared = load_recipe("probe-random", shared=["schedule.epochs=30", "model.img_size=128"])
    assert differing_keys(config_identity(probe), config_identity(shared)) == ["model.img_size: '<default>' -> 128"]
    # ...while for a fine-tuning recipe the same keys are read and do count
    ft = load_recipe("finetune")
    assert "schedule.epochs: 75 -> 20" in differing_keys(config_identity(ft), config_identity(
        load_recipe("finetune", shared=["schedule.epochs=20"])))
    # predictions hashed while the identity still held every field (and the name) are still read as this config
    from cxrvit.experiments.identity import field_identity, identity_hash
    assert hash_matches(identity_hash(field_identity(shared)), shared)
    assert not hash_matches(identity_hash(field_identity(ft)), shared)


@pytest.mark.parametrize("recipe, shared", [("probe-random", ["schedule.epochs=30", "model.img_size=128"]),
                                            ("baseline", ["model.img_size=128"]), ("finetune", [])])
def test_an_identity_recorded_under_the_every_field_rule_reads_as_today(recipe, shared):
    from cxrvit.experiments.identity import field_identity, upgrade_identity
    cfg = load_recipe(recipe, shared=shared)
    assert upgrade_identity(field_identity(cfg)) == config_identity(cfg)
    assert upgrade_identity(config_identity(cfg)) == config_identity(cfg)      # today's identities pass unchanged


def test_logging_and_checkpoint_cadence_do_not_identify_an_arm():
    """How often a run logs or checkpoints changes nothing it trains (resume is exact), so a finished arm stays
    finished when they change; a setting that does change the result still changes the identity."""
    plain = load_recipe("baseline")
    chatty = load_recipe("baseline", ["engine.log_every=1", "engine.checkpoint_every=7"])
    assert config_identity(chatty) == config_identity(plain) and config_hash(chatty) == config_hash(plain)
    assert config_identity(load_recipe("baseline", ["optim.lr=1e-3"])) != config_identity(plain)
    recorded = config_identity(plain)
    recorded["engine"] = {"log_every": 5}     # an identity.yaml written before the rule
    assert upgrade_identity(recorded) == config_identity(plain)
