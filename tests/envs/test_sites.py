"""Sites: bundled files load, samples follow the files, bad input is refused, effects are physical."""

from __future__ import annotations

import json
import math
from importlib import resources

import gymnasium as gym
import numpy as np
import pybullet as p
import pytest
import yaml

from loopsim.envs import Site, SiteError, available_sites, env_class, load_site
from loopsim.evaluation import run_expert


@pytest.fixture
def env_id(factory_env_id: str) -> str:
    """This module is written for the factory tasks (Panda, conveyor, factory sites); the warehouse
    envs have theirs in ``test_warehouse.py``."""
    return factory_env_id


EXPECTED_FACTORY_SITES = {"lab", "fast_conveyor", "gripper_faults", "heavy_slippery", "noisy_sensors"}
SEEDS = range(40)


def _schema(env_id):
    return env_class(env_id).site_schema


def _site_file(domain, name):
    text = resources.files("loopsim.configs").joinpath("sites", domain, f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def _sample_params(env, seeds=SEEDS):
    return [env.reset(seed=s)[1]["site_params"] for s in seeds]


def test_factory_sites_bundled():
    assert set(available_sites("factory")) >= EXPECTED_FACTORY_SITES
    assert available_sites("no_such_domain") == []


def test_every_bundled_site_loads(env_id, make_env):
    schema = _schema(env_id)
    names = available_sites(schema.domain)
    assert "lab" in names
    for name in names:
        env = make_env(env_id, site=name)
        obs, info = env.reset(seed=0)
        assert info["site"] == name
        assert env.observation_space.contains(obs)
        obs, *_ = env.step(env.action_space.sample())
        assert env.observation_space.contains(obs)


def test_lab_is_nominal(env_id, make_env):
    schema = _schema(env_id)
    for site in ("lab", None):
        env = make_env(env_id, site=site)
        for params in _sample_params(env, range(3)):
            assert params == schema.lab_values()
            assert list(params) == schema.names


def _support(pdef, spec):
    """(kind, allowed values or interval) implied by a site-file spec."""
    if not isinstance(spec, dict):
        return "set", [spec]
    ((kind, args),) = spec.items()
    if kind == "uniform":
        return "interval", args
    if kind == "normal":
        return "interval", [pdef.low, pdef.high]  # clipped to the allowed range
    return "set", args


@pytest.mark.parametrize("site", sorted(EXPECTED_FACTORY_SITES))
def test_site_params_follow_the_site_file(env_id, make_env, site):
    schema = _schema(env_id)
    doc = _site_file(schema.domain, site)
    specs = {n: pdef.lab for n, pdef in schema.params.items()} | (doc.get("params") or {})
    samples = _sample_params(make_env(env_id, site=site))
    for params in samples:
        assert list(params) == schema.names, "site_params must hold every schema parameter, in order"
        for name, value in params.items():
            pdef = schema.params[name]
            assert type(value) is (int if pdef.integer else float), (name, value)
            assert pdef.low <= value <= pdef.high, (name, value)
            kind, support = _support(pdef, specs[name])
            if kind == "interval":
                assert support[0] <= value <= support[1], f"{site}: {name}={value} outside {support}"
            else:
                assert value in support, f"{site}: {name}={value} not in {support}"
    # Every distributed parameter really varies over the seeds and covers its support.
    for name, spec in specs.items():
        values = [s[name] for s in samples]
        if not isinstance(spec, dict):
            assert set(values) == {spec}, f"{site}: constant {name} sampled as {set(values)}"
            continue
        ((kind, args),) = spec.items()
        if kind == "uniform" and args[0] < args[1]:
            span = args[1] - args[0]
            assert min(values) < args[0] + 0.3 * span and max(values) > args[1] - 0.3 * span, (name, values)
        elif kind == "choice":
            assert set(values) == set(args), f"{site}: {name} drew only {set(values)} of {args}"


def test_heavy_slippery_ranges(env_id, make_env):
    samples = _sample_params(make_env(env_id, site="heavy_slippery"))
    masses = [s["part_mass"] for s in samples]
    frictions = [s["part_friction"] for s in samples]
    assert all(0.5 <= m <= 1.0 for m in masses) and len(set(masses)) == len(masses)
    assert all(0.15 <= f <= 0.3 for f in frictions)


def test_same_seed_same_params_different_seed_different(env_id, make_env):
    a, b = make_env(env_id, site="noisy_sensors"), make_env(env_id, site="noisy_sensors")
    pa, pb = _sample_params(a, range(10)), _sample_params(b, range(10))
    assert pa == pb
    assert len({json.dumps(x, sort_keys=True) for x in pa}) == 10
    # The sampled parameters are a function of the seed only, not of earlier episodes.
    assert a.reset(seed=3)[1]["site_params"] == pa[3]


def test_inline_site_mapping(env_id, make_env):
    schema = _schema(env_id)
    env = make_env(env_id, site={"part_mass": 0.3})
    obs, info = env.reset(seed=0)
    assert info["site"] == "custom"
    assert info["site_params"] == {**schema.lab_values(), "part_mass": 0.3}
    env = make_env(env_id, site={"part_mass": {"uniform": [0.2, 0.4]}, "action_delay": {"choice": [0, 2]}})
    samples = _sample_params(env, range(20))
    assert all(0.2 <= s["part_mass"] <= 0.4 for s in samples)
    assert {s["action_delay"] for s in samples} == {0, 2}


def test_inline_site_document_and_site_object(env_id, make_env):
    schema = _schema(env_id)
    doc = {"name": "plant7", "description": "test", "params": {"sensor_noise": 0.01}}
    _, info = make_env(env_id, site=doc).reset(seed=0)
    assert info["site"] == "plant7" and info["site_params"]["sensor_noise"] == 0.01
    site = Site(schema, "plant8", {"gripper_force": 20.0})
    env = make_env(env_id, site=site)
    _, info = env.reset(seed=0)
    assert info["site"] == "plant8" and info["site_params"]["gripper_force"] == 20.0
    assert load_site(schema, site) is site


@pytest.mark.parametrize("domain_env", ["loopsim/FactoryPickPlace-v0", "loopsim/WarehouseNavigate-v0"])
def test_site_document_cannot_borrow_a_bundled_name_with_other_conditions(domain_env, make_env):
    """A document named like a bundled site runs only with that site's conditions: otherwise
    ``info["site"]``, stores and per-site tables filed shifted episodes under that name (e.g. ``lab``)."""
    schema = _schema(domain_env)
    param = "part_mass" if schema.domain == "factory" else "floor_friction"
    with pytest.raises(SiteError, match=r"named .lab.: a bundled \w+ site has that name and other"):
        make_env(domain_env, site={"name": "lab", "params": {param: 0.5}})
    env = make_env(domain_env)
    with pytest.raises(SiteError, match="bundled"):
        env.unwrapped.site = {"name": "lab", "params": {param: 0.5}}
    assert env.unwrapped.site.name == "lab" and env.unwrapped.site.overrides == {}  # kept
    # the same conditions under the bundled name, and other conditions under a name of their own, work
    lab_value = schema.lab_values()[param]
    for name in available_sites(schema.domain):
        doc = {"name": name, "params": _site_file(schema.domain, name).get("params") or {}}
        assert load_site(schema, doc).overrides == load_site(schema, name).overrides
    assert load_site(schema, {"name": "lab", "params": {param: lab_value}}).name == "lab"
    assert load_site(schema, {"name": "plant7", "params": {param: 0.5}}).name == "plant7"
    # a name that differs from a bundled one only in case made a second row beside it in tables
    for name in ("Lab", "LAB", "\uff4c\uff41\uff42", "\uff2c\uff21\uff22"):  # ...and fullwidth ｌａｂ, ＬＡＢ
        with pytest.raises(SiteError, match=r"the bundled \w+ site 'lab' differs only in case"):
            load_site(schema, {"name": name, "params": {param: 0.5}})
        with pytest.raises(SiteError, match="differs only in case"):
            load_site(schema, {"name": name, "params": {}})
    # names a table cannot show: empty, blank, padded (" lab" looked like lab), control characters
    for name in ("", " ", " lab", "lab ", "lab\n", "plant\t7"):
        with pytest.raises(SiteError, match=r"must be non-empty, printable and without leading"):
            load_site(schema, {"name": name, "params": {param: 0.5}})
        with pytest.raises(SiteError, match=r"must be non-empty"):
            Site(schema, name, {param: 0.5})
    assert load_site(schema, {"name": "plant 7 (north)", "params": {}}).name == "plant 7 (north)"
    # an unknown name gets the bundled one it resembles
    with pytest.raises(SiteError, match=r"unknown \w+ site 'Lab' \(did you mean 'lab'\?\); available"):
        load_site(schema, "Lab")
    # a blank YAML "name:" (None) was recorded as a site named "None"
    with pytest.raises(SiteError, match="must be strings"):
        load_site(schema, {"name": None, "params": {}})
    # a Site object took the same names unchecked
    for site in (Site(schema, "lab", {param: 0.5}), Site(schema, "Lab", {})):
        with pytest.raises(SiteError, match="bundled"):
            load_site(schema, site)
        with pytest.raises(SiteError, match="bundled"):
            env.unwrapped.site = site
    assert load_site(schema, Site(schema, "lab", {})).name == "lab"
    # a document without params was read as parameters: "unknown parameter(s) ['name']"
    with pytest.raises(SiteError, match=r"site document with keys \['name'\] has no 'params'"):
        load_site(schema, {"name": "lab"})


def test_site_assigned_by_name_between_episodes(env_id, make_env, helpers):
    """``env.unwrapped.site = "name"`` (or a mapping) applies from the next reset, as gym.make(site=...)."""
    shifted = sorted(n for n in available_sites(_schema(env_id).domain) if n != "lab")[0]
    made = make_env(env_id, site=shifted, max_steps=20)
    switched = make_env(env_id, max_steps=20)
    helpers.rollout(switched, 1, helpers.RandomPolicy(20, 1, switched.action_space.shape[0]), 20)
    switched.unwrapped.site = shifted
    policy = lambda: helpers.RandomPolicy(20, 2, made.action_space.shape[0])  # noqa: E731
    r1 = helpers.rollout(made, 5, policy(), 20, reset_on_end=False)
    r2 = helpers.rollout(switched, 5, policy(), 20, reset_on_end=False)
    assert helpers.first_difference(r1, r2) is None
    switched.unwrapped.site = {"action_delay": {"choice": [2]}}
    assert switched.reset(seed=0)[1]["site_params"]["action_delay"] == 2
    with pytest.raises(SiteError, match="no_such_site"):
        switched.unwrapped.site = "no_such_site"
    assert switched.unwrapped.site.name == "custom"  # unchanged: the inline site of before


def test_unknown_site_name_lists_valid_names(env_id):
    schema = _schema(env_id)
    with pytest.raises(SiteError) as excinfo:
        env_class(env_id)(site="no_such_site")
    message = str(excinfo.value)
    assert "no_such_site" in message
    for name in available_sites(schema.domain):
        assert name in message
    assert isinstance(excinfo.value, ValueError)


def test_unknown_parameter_lists_valid_parameters(env_id):
    schema = _schema(env_id)
    with pytest.raises(SiteError) as excinfo:
        env_class(env_id)(site={"part_mas": 0.3})
    message = str(excinfo.value)
    assert "part_mas" in message
    for name in schema.names:
        assert name in message


MALFORMED = {
    "uniform_reversed": {"conveyor_speed": {"uniform": [0.2, 0.1]}},
    "uniform_one_arg": {"conveyor_speed": {"uniform": [0.1]}},
    "uniform_three_args": {"conveyor_speed": {"uniform": [0.1, 0.2, 0.3]}},
    "uniform_not_list": {"conveyor_speed": {"uniform": 0.1}},
    "unknown_kind": {"part_mass": {"foo": 1}},
    "two_kinds": {"part_mass": {"uniform": [0.1, 0.2], "normal": [0.1, 0.01]}},
    "empty_mapping": {"part_mass": {}},
    "normal_negative_std": {"part_mass": {"normal": [0.1, -0.01]}},
    "choice_empty": {"action_delay": {"choice": []}},
    "above_range": {"part_mass": 5.0},
    "below_range": {"part_mass": -1.0},
    "uniform_out_of_range": {"conveyor_speed": {"uniform": [0.1, 1.0]}},
    "normal_mean_out_of_range": {"part_friction": {"normal": [3.0, 0.1]}},
    "choice_out_of_range": {"action_delay": {"choice": [1, 9]}},
    "delay_not_integer": {"action_delay": 1.5},
    "delay_choice_not_integer": {"action_delay": {"choice": [1, 2.5]}},
    "delay_uniform_not_integer": {"action_delay": {"uniform": [0.5, 2]}},
    "string_value": {"part_mass": "heavy"},
    "bool_value": {"part_mass": True},
    "nan_value": {"part_mass": math.nan},
    "inf_value": {"part_mass": math.inf},
    "none_value": {"part_mass": None},
    "document_extra_key": {"params": {}, "colour": "red"},
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_site_refused(env_id, name):
    schema = _schema(env_id)
    with pytest.raises(SiteError):
        load_site(schema, MALFORMED[name])


def test_malformed_site_refused_by_constructor_without_leaking_a_client(env_id):
    connected = {i for i in range(256) if p.getConnectionInfo(physicsClientId=i)["isConnected"]}
    with pytest.raises(SiteError, match="uniform"):
        env_class(env_id)(site={"conveyor_speed": {"uniform": [0.2, 0.1]}})
    with pytest.raises(SiteError):
        env_class(env_id)(site=42)
    assert {i for i in range(256) if p.getConnectionInfo(physicsClientId=i)["isConnected"]} == connected


BAD_ARGS = [
    ("obs_mode", "pixels"),
    ("obs_mode", None),
    ("reward_type", "shaped"),
    ("render_mode", "human_like"),
    ("render_mode", "rgb"),
    ("image_size", 0),
    ("image_size", 8),
    ("image_size", 84.0),
    ("image_size", True),
    ("image_size", "84"),
    ("render_size", -1),
    ("max_steps", 0),
    ("max_steps", -5),
    ("max_steps", 2.5),
    ("max_steps", True),
]


@pytest.mark.parametrize(("key", "value"), BAD_ARGS, ids=[f"{k}={v!r}" for k, v in BAD_ARGS])
def test_bad_constructor_arguments(env_id, key, value):
    with pytest.raises(ValueError, match=key):
        env_class(env_id)(**{key: value})


# ---------------------------------------------------------------------------------------------- physics


def test_part_mass_and_friction_applied(env_id, make_env, helpers):
    """At heavy_slippery every loose part has the sampled mass and friction in PyBullet."""
    env = make_env(env_id, site="heavy_slippery")
    u = env.unwrapped
    seen = set()
    for seed in range(4):
        _, info = env.reset(seed=seed)
        params = info["site_params"]
        bodies = helpers.free_dynamic_bodies(u.sim.id)
        assert bodies, "no loose parts found"
        for body in bodies:
            dyn = p.getDynamicsInfo(body, -1, physicsClientId=u.sim.id)
            assert dyn[0] == pytest.approx(params["part_mass"], rel=1e-9)
            assert dyn[1] == pytest.approx(params["part_friction"], rel=1e-9)
        seen.add(params["part_mass"])
    assert len(seen) == 4
    env = make_env(env_id, site="lab")
    env.reset(seed=0)
    for body in helpers.free_dynamic_bodies(env.unwrapped.sim.id):
        assert p.getDynamicsInfo(body, -1, physicsClientId=env.unwrapped.sim.id)[0] == pytest.approx(0.1)


def _conveyor_env(make_env, env_id, **kwargs):
    env = make_env(env_id, **kwargs)
    if not hasattr(env.unwrapped, "conveyor"):
        pytest.skip("no conveyor in this task")
    return env


@pytest.mark.parametrize("site", ["lab", "fast_conveyor"])
def test_parts_ride_at_the_sampled_belt_speed(env_id, make_env, site):
    env = _conveyor_env(make_env, env_id, site=site)
    u = env.unwrapped
    hold = u._hold_action()
    for seed in range(3):
        _, info = env.reset(seed=seed)
        speed = info["site_params"]["conveyor_speed"]
        vy = []
        for t in range(40):
            env.step(hold)
            if t >= 10:
                vy.append(u.part_velocities()[:, 1])
        mean_vy = np.mean(vy, axis=0)
        assert np.all(np.abs(mean_vy - speed) < 0.02), f"seed {seed}: parts at {mean_vy}, belt {speed} [m/s]"


def test_belt_jitter_is_real(env_id, make_env):
    env = _conveyor_env(make_env, env_id, site={"conveyor_jitter": 0.05})
    u = env.unwrapped
    lab = make_env(env_id)
    for e in (env, lab):
        e.reset(seed=0)
    speeds = {id(env): [], id(lab): []}
    for _ in range(30):
        for e in (env, lab):
            e.step(u._hold_action())
            belt = p.getJointState(e.unwrapped.conveyor, 0, physicsClientId=e.unwrapped.sim.id)
            speeds[id(e)].append(belt[1])
    assert np.std(speeds[id(env)]) > 0.02
    assert np.std(speeds[id(lab)]) < 1e-3


def _true_first_position(env) -> np.ndarray:
    u = env.unwrapped
    return u.part_positions()[0] if hasattr(u, "part_positions") else u.peg_tip()


def test_sensor_noise_is_what_the_robot_perceives(env_id, make_env):
    """Observed positions and goals are the perceived ones, carrying the site's noise; the true state not."""
    for noise in (0.0, 0.01):
        env = make_env(env_id, obs_mode="goal", site={"sensor_noise": noise})
        obs, _ = env.reset(seed=0)
        errors = []
        for _ in range(60):
            obs, *_ = env.step(env.unwrapped._hold_action())
            np.testing.assert_array_equal(obs["observation"][7:10], obs["achieved_goal"][:3])
            errors.append(obs["achieved_goal"][:3] - _true_first_position(env))
        errors = np.array(errors)
        if noise == 0:
            assert np.abs(errors).max() < 1e-6, "noise-free site, but perceived != true"
        else:
            assert 0.6 * noise < errors.std() < 1.5 * noise, f"noise std {errors.std():.4f}, site: {noise}"


@pytest.mark.parametrize("delay", [1, 3])
def test_action_delay_shifts_actions(env_id, make_env, helpers, delay):
    """At action_delay=d the env behaves like lab fed d hold actions first: actions act d steps late."""
    actions = helpers.random_actions(30, seed=8)
    delayed = make_env(env_id, obs_mode="goal", site={"action_delay": delay})
    nominal = make_env(env_id, obs_mode="goal")
    delayed.reset(seed=4)
    nominal.reset(seed=4)
    hold = nominal.unwrapped._hold_action()
    shifted = [hold] * delay + list(actions[: len(actions) - delay])
    for t, (a, b) in enumerate(zip(actions, shifted, strict=True)):
        o1, r1, te1, tr1, _ = delayed.step(a)
        o2, r2, te2, tr2, _ = nominal.step(b)
        assert helpers.obs_equal(o1, o2), f"step {t}: delayed env differs from the shifted nominal env"
        if te1 or tr1:
            break


def test_weak_gripper_cannot_hold(env_id):
    """gripper_force is applied: the expert succeeds at lab and never with 1 N fingers on a 1 kg part."""
    sites = {"lab": "lab", "weak": {"gripper_force": 1.0, "part_mass": 1.0}}
    results = {
        name: sum(e.success for e in run_expert(env_id, site, episodes=3).episodes)
        for name, site in sites.items()
    }
    assert results["lab"] == 3 and results["weak"] == 0, results


def test_a_site_file_with_a_repeated_key_is_refused(tmp_path, monkeypatch):
    """PyYAML keeps the last of two equal keys silently; a site file that repeats one is refused."""
    import loopsim.envs.core.site as site_module
    from loopsim.envs.core.site import SiteError, load_site
    from loopsim.envs.factory.base import FACTORY_SCHEMA

    (tmp_path / "factory").mkdir()
    (tmp_path / "factory" / "twice.yaml").write_text(
        "description: x\nparams:\n  part_mass: 0.5\n  part_mass: 2.0\n"
    )
    monkeypatch.setattr(site_module, "_site_dir", lambda domain: tmp_path / domain)
    with pytest.raises(SiteError, match="(?s)twice.yaml is not valid YAML.*'part_mass' twice"):
        load_site(FACTORY_SCHEMA, "twice")


def test_read_site_file_names_the_site_after_the_file_unless_it_has_a_name(tmp_path):
    from loopsim.envs import read_site_file

    (tmp_path / "dock3.yaml").write_text("description: d\nparams:\n  part_mass: 0.5\n")
    (tmp_path / "other.yml").write_text("name: east_dock\nparams: {part_mass: {uniform: [0.4, 0.6]}}\n")
    assert read_site_file(tmp_path / "dock3.yaml") == {
        "name": "dock3", "description": "d", "params": {"part_mass": 0.5}}
    doc = read_site_file(str(tmp_path / "other.yml"))
    assert doc["name"] == "east_dock" and doc["params"] == {"part_mass": {"uniform": [0.4, 0.6]}}
    env = gym.make("loopsim/FactoryPickPlace-v0", site=doc)
    try:
        _, info = env.reset(seed=0)
        assert info["site"] == "east_dock" and 0.4 <= info["site_params"]["part_mass"] <= 0.6
    finally:
        env.close()


@pytest.mark.parametrize(
    "text, message",
    [
        ("description: forgot the conditions\n", r"needs 'params'.*\{\} for lab's conditions"),
        ("params:\n", r"needs 'params'.*got None"),
        ("params: [part_mass, 0.5]\n", r"needs 'params'.*got \['part_mass', 0.5\]"),
        ("name: plant\nparams: {}\n", r"unknown keys \['name'\]; allowed: description, params"),
        ("description: 5\nparams: {}\n", r"description must be text, got 5"),
        ("", r"must hold a mapping with 'params', got NoneType"),
    ],
)
def test_bundled_site_files_follow_the_site_file_rule(tmp_path, monkeypatch, text, message):
    """A bundled site file obeys the rule of one's own site files (``read_site_file``): a file without
    ``params`` (or an empty one) loaded as lab's conditions under the file's name, silently."""
    import loopsim.envs.core.site as site_module
    from loopsim.envs.factory.base import FACTORY_SCHEMA

    (tmp_path / "factory").mkdir()
    (tmp_path / "factory" / "plant.yaml").write_text(text)
    monkeypatch.setattr(site_module, "_site_dir", lambda domain: tmp_path / domain)
    with pytest.raises(SiteError, match=f"(?s)site file plant.yaml.*{message}"):
        load_site(FACTORY_SCHEMA, "plant")


def test_every_bundled_site_file_has_params():
    """The bundled files themselves pass the rule (lab's is ``params: {}``)."""
    for domain in ("factory", "warehouse"):
        for name in available_sites(domain):
            doc = _site_file(domain, name)
            assert isinstance(doc.get("params"), dict), (domain, name)


@pytest.mark.parametrize("params", [None, [], "part_mass: 0.5"])
def test_a_site_document_needs_a_params_mapping(params):
    """``{"name": "x", "params": None}`` ran as lab's conditions under "x", where a site file with
    ``params: null`` is refused."""
    from loopsim.envs.factory.base import FACTORY_SCHEMA

    with pytest.raises(SiteError, match=r"site document 'x' needs 'params', a mapping"):
        load_site(FACTORY_SCHEMA, {"name": "x", "params": params})
