"""YAML loading shared by configs and site files: a safe loader that refuses duplicated keys."""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Hashable
from typing import Any

import yaml

__all__ = ["UniqueKeyLoader", "describe_yaml_error", "load_unique", "number_text_hint"]


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with the same key twice.

    PyYAML silently keeps the last of duplicated keys, so ``epochs: 30`` written twice in a config would
    lose one value without a word; a config is refused instead.
    """

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        """Build the mapping of ``node``; raises ``ConstructorError`` naming a repeated or unhashable key.

        Merge keys (``<<: *anchor``) work as in ``yaml.SafeLoader``: only the keys written in the
        mapping itself are checked for repeats (a written key overrides a merged one, as YAML says).
        """
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):  # PyYAML's own check, made before ours looks the key up
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, "found unhashable key",
                    key_node.start_mark,
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found the key {key!r} twice (first {seen[key]}); each key may appear once",
                    key_node.start_mark,
                )
            mark = key_node.start_mark
            seen[key] = f"at line {mark.line + 1}, column {mark.column + 1}"
        return super().construct_mapping(node, deep=deep)


def load_unique(text: str) -> Any:
    """Parse YAML ``text`` like ``yaml.safe_load``, refusing a mapping that repeats a key.

    Raises:
        yaml.YAMLError: If the text is not valid YAML, a mapping repeats a key (named, with both line
            numbers) or has a list or mapping as a key, or the text nests deeper than Python's
            recursion limit allows (PyYAML's parser recurses per level).
    """
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise yaml.YAMLError(
            f"nested too deeply to be parsed (PyYAML recurses per level; Python's limit is "
            f"{sys.getrecursionlimit()} calls)"
        ) from None


def describe_yaml_error(exc: BaseException) -> str:
    """One line for a YAML error: ``line L, column C: problem (context)``; PyYAML's own text spans lines.

    Args:
        exc: A ``yaml.YAMLError`` (or ``UnicodeDecodeError``) from :func:`load_unique`.

    Returns:
        The message on one line, with 1-based line and column where PyYAML gives a position.
    """
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        context = f" ({exc.context})" if exc.context else ""
        return " ".join(f"{where}{exc.problem}{context}".split())
    return " ".join(str(exc).split())


def number_text_hint(value: Any) -> str | None:
    """What to write instead, when YAML read a number as text; ``None`` for anything else.

    YAML 1.1 (PyYAML) reads ``1e-3`` as text (its floats need a dot and a signed exponent:
    ``1.0e-3``), and a quoted number is text too. Used by every config and site-file message.

    Args:
        value: A value that was expected to be a number.

    Returns:
        A hint such as ``"YAML reads an exponent without a dot or a sign as text: write 0.001"``.
    """
    if not isinstance(value, str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    if not math.isfinite(number):  # "nan", "inf": text in YAML 1.1 (.nan, .inf), and never allowed anyway
        return None
    if re.search(r"\d[eE][-+]?\d", value):
        return f"YAML reads an exponent without a dot or a sign as text: write {number!r}"
    return f"a number in quotes is text: write {value.strip()} without quotes"
