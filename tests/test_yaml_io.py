"""The shared YAML loader: safe, one key once, and every bad text a ``yaml.YAMLError`` on one line."""

from __future__ import annotations

import pytest
import yaml

from loopsim.yaml_io import describe_yaml_error, load_unique, number_text_hint


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("params:\n  ? [a]\n  : 1\n", "line 2, column 5: found unhashable key"),  # was a TypeError
        ("params:\n  ? {a: 1}\n  : 1\n", "found unhashable key"),
        ("[" * 5000, "nested too deeply"),  # was a RecursionError
        ("a: 1\nb: [1, 2\n", "line 3, column 1: expected ',' or ']'"),
        ("seed: 0\nseed: 1\n", "line 2, column 1: found the key 'seed' twice"),
        ("x: !!python/object/apply:os.system ['true']\n", "could not determine a constructor"),
    ],
)
def test_bad_yaml_is_a_yaml_error_described_on_one_line(text, message):
    with pytest.raises(yaml.YAMLError) as info:
        load_unique(text)
    line = describe_yaml_error(info.value)
    assert "\n" not in line and message in line


def test_merge_keys_work_as_in_safe_load():
    """``<<: *anchor`` was refused ("could not determine a constructor for the tag ...merge")."""
    text = "base: &b {part_mass: 0.5, sensor_noise: 0.01}\nparams: {<<: *b, part_mass: 0.7}\n"
    assert load_unique(text) == yaml.safe_load(text)
    assert load_unique(text)["params"] == {"part_mass": 0.7, "sensor_noise": 0.01}  # written key wins
    with pytest.raises(yaml.YAMLError, match="'part_mass' twice"):  # written twice is still refused
        load_unique("base: &b {a: 1}\nparams: {<<: *b, part_mass: 0.7, part_mass: 0.8}\n")


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        ("0.5", "a number in quotes is text: write 0.5 without quotes"),
        ("1e-3", "YAML reads an exponent without a dot or a sign as text: write 0.001"),
        # unquoted nan / inf are text in YAML 1.1 too, but no spelling of them is allowed: no hint
        # (it told users to unquote a value that had no quotes)
        ("nan", None),
        ("-inf", None),
        ("Infinity", None),
        ("fast", None),
        (0.5, None),
    ],
)
def test_number_text_hint(value, hint):
    assert number_text_hint(value) == hint
