"""Config loading, overrides and validation: each problem is one line naming the key."""

import pytest

from pipeline.config import Config, ConfigError, config_from_dict, diff_configs, load_config
from pipeline.run import resolve_config_path, shipped_configs


def test_defaults_equal_shipped_default():
    assert load_config(resolve_config_path("default")) == Config()
    assert load_config() == Config()


@pytest.mark.parametrize("name", ["default", "cifar10_gpu", "imagenet_spos_shufflenet",
                                  "imagenet_bnnas_mobilenet", "spos_baseline"])
def test_shipped_configs_load(name):
    assert name in shipped_configs()
    cfg = load_config(resolve_config_path(name))
    from search_spaces import get_space
    get_space(cfg.space.name)


def test_overrides_apply_with_types():
    cfg = load_config(None, ["supernet.epochs=3", "search.max_flops=5e6", "data.augment=false",
                             "supernet.mode=bn_all", "run_dir=/tmp/x"])
    assert (cfg.supernet.epochs, cfg.search.max_flops, cfg.data.augment) == (3, 5e6, False)
    assert cfg.supernet.mode == "bn_all" and cfg.run_dir == "/tmp/x"
    assert isinstance(cfg.search.max_flops, float)


@pytest.mark.parametrize("overrides,message", [
    (["supernet.epoch=3"], "unknown key supernet.epoch; known keys here: "),
    (["bogus=1"], "unknown key bogus"),
    (["supernet.epochs=three"], "supernet.epochs: expected an integer, got 'three'"),
    (["data.augment=maybe"], "data.augment: expected true or false"),
    (["supernet.mode=bn_some"], "supernet.mode: 'bn_some' is not one of bn_last, bn_all, all"),
    (["supernet.epochs=0"], "supernet.epochs must be >= 1, got 0"),
    (["data.fraction=1.5"], "data.fraction must be in (0, 1]"),
    (["search.parents=60"], "search.parents must not exceed search.population"),
    (["search.min_flops=9", "search.max_flops=3"], "search.min_flops must not exceed search.max_flops"),
    (["retrain.grace_period=20"], "retrain.grace_period must be between 1 and retrain.epochs"),
    (["data.name=mnist"], "data.name: unknown dataset 'mnist'"),
    (["data.name=synthetic"], "data.val_size=5000 must be below data.synthetic_train=2048"),
    (["supernet"], "expected key=value"),
    (["supernet=3"], "supernet: expected a mapping"),
    (["supernet.lr=.inf"], "supernet.lr: expected a finite number, got inf"),
    (["supernet.lr=1e400"], "supernet.lr: expected a finite number, got '1e400'"),
    (["search.max_params=.nan"], "search.max_params: expected a finite number, got nan"),
    (["data.fraction=-.inf"], "data.fraction: expected a finite number, got -inf"),
    (["seed=100000000000000000000000"], "seed: 100000000000000000000000 does not fit in 64 bits"),
    (["supernet.epochs=-99999999999999999999"], "supernet.epochs: -99999999999999999999 does not fit in 64 bits"),
    (["seed=1e23"], "seed: expected an integer, got '1e23'"),
    (["run_dir="], "run_dir must not be empty"),
    (["retrain.scheduler=hyperband"], "retrain.scheduler: 'hyperband' is not one of asha, sync"),
    (["retrain.scheduler=sync", "retrain.max_concurrent=1"],
     "retrain.max_concurrent applies to retrain.scheduler=asha only"),
])
def test_bad_values_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_malformed_yaml_and_missing_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("supernet:\n  epochs: [1,\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML at line \d+"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(p)


def test_round_trip_and_diff(tmp_path):
    cfg = load_config(None, ["supernet.epochs=3"])
    p = tmp_path / "saved.yaml"
    p.write_text(cfg.to_yaml())
    assert load_config(p) == cfg
    other = config_from_dict({**cfg.to_dict(), "seed": 5})
    assert diff_configs(cfg.to_dict(), other.to_dict()) == ["seed: 0 -> 5"]
