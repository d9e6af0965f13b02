"""Configs: YAML + overrides into typed models; bad keys and values named before any work."""

import pytest

from loopsim.config import (
    CollectConfig,
    ConfigError,
    EnvConfig,
    TrainConfig,
    apply_overrides,
    check_env_config,
    dump_config,
    load_config,
)

ENV = {"id": "loopsim/FactoryPickPlace-v0"}
BC = {"env": ENV, "policy": {"type": "bc"}, "train": {"stores": ["demos.zarr"]}}
SB3 = {"env": ENV, "policy": {"type": "sb3", "algo": "SAC"}, "train": {"total_timesteps": 1000}}


def test_overrides_parse_yaml_values_and_create_sections():
    out = apply_overrides({"a": {"b": 1}}, ["a.b=50", "a.c=[x, 2]", "d.e=null", "f=0.5", "g=hello world"])
    assert out == {"a": {"b": 50, "c": ["x", 2]}, "d": {"e": None}, "f": 0.5, "g": "hello world"}


@pytest.mark.parametrize("twice", [["a.b=1", "a.b=2"], ["a.b=1", " a . b =1"], ["f=1", "f=1"]])
def test_an_override_given_twice_is_refused(twice):
    """The last one won, silently: `train.epochs=30 ... train.epochs=3` trained 3 epochs."""
    with pytest.raises(ConfigError, match=r"override (a\.b|f) is given twice \(.* and .*\): give it once"):
        apply_overrides({"a": {"b": 0}}, twice)
    assert apply_overrides({"a": {"b": 0}}, ["a.b=1", "a.c=2", "a={b: 3}"]) == {"a": {"b": 3}}


@pytest.mark.parametrize("bad", ["noequals", "=3", "a..b=1", "a.b.c=1"])
def test_malformed_overrides_are_refused(bad):
    with pytest.raises(ConfigError, match="override"):
        apply_overrides({"a": {"b": 1}}, [bad])


def test_train_config_from_file_with_overrides(tmp_path):
    import yaml

    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(BC))
    cfg = load_config(TrainConfig, path, ["train.epochs=50", "seed=3", "eval.sites=[lab, fast_conveyor]"])
    assert cfg.seed == 3 and cfg.train.epochs == 50 and cfg.eval.sites == ["lab", "fast_conveyor"]
    assert cfg.train.type == "bc"
    # The dump is the resolved config: loading it again gives the same config.
    again = load_config(TrainConfig, yaml.safe_load(dump_config(cfg)))
    assert again == cfg


@pytest.mark.parametrize(
    ("base", "overrides", "expected"),
    [
        (BC, ["train.epoch=5"], ["train.epoch: unknown key (value 5)", "'epochs'"]),
        (BC, ["policy.hidden=3"], ["policy.hidden: unknown key", "'hidden_sizes'"]),
        (BC, ["foo=1"], ["foo: unknown key", "'train'"]),
        (BC, ["train.lr=-1"], ["train.lr = -1", "greater than 0"]),
        (BC, ["seed=-4"], ["seed = -4", "greater than or equal to 0"]),
        (BC, ["policy.type=foo"], ["policy.type = 'foo'", "['bc', 'sb3']"]),
        (BC, ["policy.activation=swish"], ["policy.activation = 'swish'", "'relu'"]),
        (BC, ["env.id=loopsim/Nope-v0"], ["env.id = 'loopsim/Nope-v0'", "loopsim/FactorySort-v0"]),
        (BC, ["train.total_timesteps=5"], ["train.total_timesteps: unknown key", "'stores'"]),
        (SB3, ["policy.algo=XX"], ["policy.algo = 'XX'", "'PPO'", "'SAC'"]),
        (SB3, ["train.total_timesteps=0"], ["train.total_timesteps = 0"]),
        (SB3, ["eval.sites=[]"], ["eval.sites = []"]),
        ({"env": ENV}, [], ["policy: required key is missing", "train: required key is missing"]),
        # from the train break-it pass: bools were read as numbers and numbers or text as bools
        # (train.epochs=true trained 1 epoch), quoted numbers as numbers
        (BC, ["train.epochs=true"], ["train.epochs = True", "valid integer"]),
        (BC, ["seed=false"], ["seed = False", "valid integer"]),
        (BC, ["eval.episodes=true"], ["eval.episodes = True", "valid integer"]),
        (BC, ["eval.deterministic=1"], ["eval.deterministic = 1", "valid boolean"]),
        (BC, ["train.epochs='3'"], ["train.epochs = '3'", "valid integer"]),
        (BC, ["train.lr=true"], ["train.lr = True", "valid number"]),
        # YAML 1.1 reads 1e-3 as text: the message said only "Input should be a valid number"
        (BC, ["train.lr=1e-3"], ["train.lr = '1e-3'", "without a dot or a sign as text: write 0.001"]),
        (BC, ["train.epochs='3'"], ["a number in quotes is text: write 3 without quotes"]),
        (BC, ["train.lr=1.0e+39"], ["train.lr = 1e+39", "less than or equal to 3400000000"]),  # > float32
        # evaluation seeds past the largest seed (loopsim eval and collect refused them)
        (BC, ["eval.seed=2147483647", "eval.episodes=2"], ["seed + episodes - 1 = 2147483648 exceeds"]),
        (BC, ["eval.episodes=2000000000"], ["eval.episodes = 2000000000", "less than or equal to 100000"]),
    ],
)
def test_bad_keys_and_values_are_named(base, overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, base, overrides)
    message = str(info.value)
    for part in expected:
        assert part in message, message


def test_config_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TrainConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(TrainConfig, bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(TrainConfig, listy)


def test_duplicate_keys_are_refused_not_silently_overwritten(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("seed: 0\ntrain:\n  epochs: 30\n  lr: 0.001\n  epochs: 5\n")
    with pytest.raises(ConfigError, match=r"found the key 'epochs' twice \(first .*line 3"):
        load_config(TrainConfig, path)
    path.write_text("seed: 0\nseed: 1\n")
    with pytest.raises(ConfigError, match="'seed' twice"):
        load_config(TrainConfig, path)


def test_yaml_tags_do_not_run_code(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("seed: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(TrainConfig, path)


def test_collect_config_defaults_to_the_expert():
    cfg = load_config(CollectConfig, {"env": ENV, "episodes": 3, "store": "x.zarr"}, ["policy.noise_std=0.1"])
    assert cfg.policy.type == "expert" and cfg.policy.noise_std == 0.1
    with pytest.raises(ConfigError, match="policy.noise: unknown key"):
        load_config(CollectConfig, {"env": ENV, "episodes": 3, "store": "x.zarr"}, ["policy.noise=0.1"])
    with pytest.raises(ConfigError, match="not a loopsim policy checkpoint"):
        load_config(CollectConfig, {"env": ENV, "episodes": 3, "store": "x.zarr"},
                    ["policy.type=checkpoint", "policy.path=/nonexistent"])
    with pytest.raises(ConfigError, match="exceeds"):
        load_config(CollectConfig, {"env": ENV, "episodes": 3, "store": "x.zarr", "seed": 2**31 - 2})


def test_check_env_config_names_site_and_kwargs():
    check_env_config(EnvConfig(id=ENV["id"], site="heavy_slippery"), ["lab", "fast_conveyor"])
    with pytest.raises(ConfigError, match="env.site: site 'moon' is not a factory site; allowed: .*'lab'"):
        check_env_config(EnvConfig(id=ENV["id"], site="moon"))
    with pytest.raises(ConfigError, match="eval.sites: site 'moon'"):
        check_env_config(EnvConfig(id=ENV["id"]), ["lab", "moon"])
    with pytest.raises(ConfigError, match="env.kwargs = .*obs_mode"):
        check_env_config(EnvConfig(id=ENV["id"], kwargs={"obs_mode": "telepathy"}))
    with pytest.raises(ConfigError, match="env.kwargs"):
        check_env_config(EnvConfig(id=ENV["id"], kwargs={"no_such_kwarg": 1}))
    with pytest.raises(ValueError, match="env.site, not inside env.kwargs"):
        EnvConfig(id=ENV["id"], kwargs={"site": "lab"})


def test_a_huge_collect_is_refused_before_its_store_exists(tmp_path):
    """2e9 episodes were accepted, the store created, then the job's episode list ran out of memory."""
    with pytest.raises(ConfigError, match=r"episodes = 2000000000.*less than or equal to 100000"):
        load_config(CollectConfig, {"env": ENV, "episodes": 2_000_000_000, "store": str(tmp_path / "s.zarr")})
    assert not (tmp_path / "s.zarr").exists()
    cfg = load_config(CollectConfig, {"env": ENV, "episodes": 100_000, "store": "s.zarr", "seed": 5})
    assert cfg.episodes == 100_000  # floats for float fields still take integers: train.lr=1 is 1.0
    assert load_config(TrainConfig, BC, ["train.lr=1"]).train.lr == 1.0


def test_the_cli_episode_limit_is_the_config_one():
    from loopsim.cli import _MAX_EPISODES
    from loopsim.config import MAX_EPISODES

    assert _MAX_EPISODES == MAX_EPISODES
