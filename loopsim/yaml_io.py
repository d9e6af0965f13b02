"""YAML loading shared by configs and site files: a safe loader that refuses duplicated keys."""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["UniqueKeyLoader", "load_unique"]


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with the same key twice.

    PyYAML silently keeps the last of duplicated keys, so ``epochs: 30`` written twice in a config would
    lose one value without a word; a config is refused instead.
    """

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        """Build the mapping of ``node``; raises ``ConstructorError`` naming a repeated key."""
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found the key {key!r} twice (first {seen[key]}); each key may appear once",
                    key_node.start_mark,
                )
            seen[key] = str(key_node.start_mark).strip()
        return super().construct_mapping(node, deep=deep)


def load_unique(text: str) -> Any:
    """Parse YAML ``text`` like ``yaml.safe_load``, refusing a mapping that repeats a key.

    Raises:
        yaml.YAMLError: If the text is not valid YAML or a mapping repeats a key (named, with both
            line numbers).
    """
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
