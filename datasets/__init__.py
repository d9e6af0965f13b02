"""The Zarr episode store of loopsim: crash-safe recording of episodes and reading them for training.

See :mod:`loopsim.datasets.store` for the on-disk layout and the commit protocol,
:mod:`loopsim.datasets.recorder` for recording from envs and vector envs,
:mod:`loopsim.datasets.sampling` for torch datasets, :mod:`loopsim.datasets.minari_io` for Minari.
"""

from loopsim.datasets.recorder import EpisodeRecorder, RecordEpisodes, RecordVectorEpisodes
from loopsim.datasets.schema import (
    SCHEMA_VERSION,
    STEP_EXTRAS,
    Episode,
    EpisodeMetadata,
    NotAStoreError,
    StoreDamagedError,
    StoreError,
    StoreLockedError,
    StoreSchemaError,
)
from loopsim.datasets.store import META_COLUMNS, EpisodeStore, StoreCheck

__all__ = [
    "META_COLUMNS",
    "SCHEMA_VERSION",
    "STEP_EXTRAS",
    "Episode",
    "EpisodeMetadata",
    "EpisodeRecorder",
    "EpisodeStore",
    "NotAStoreError",
    "RecordEpisodes",
    "RecordVectorEpisodes",
    "StoreCheck",
    "StoreDamagedError",
    "StoreError",
    "StoreLockedError",
    "StoreSchemaError",
]
