"""loopsim: simulate the data flywheel of deployed robots.

Importing loopsim registers its Gymnasium envs (``loopsim/<Domain><Task>-v0``).
"""

from importlib.metadata import PackageNotFoundError, version

from loopsim.envs import register_envs

try:
    __version__ = version("loopsim")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

register_envs()

__all__ = ["__version__"]
