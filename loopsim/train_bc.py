"""``loopsim train`` for ``policy.type: bc``: behaviour cloning from episode stores into a run directory.

:func:`check_bc_config` refuses unusable stores before any work starts; :func:`train_bc` trains a
:class:`~loopsim.policies.BCPolicy` with :class:`~loopsim.policies.bc.BCTrainer` on the union of
``train.stores`` and writes, into the :class:`~loopsim.training.RunDir`:

- ``checkpoint/`` after every epoch: the deployable policy, with the resolved config and its
  provenance (stores, episodes, transitions, epochs, training time);
- ``resume/bc_state.pt`` after every epoch: network, optimizer and shuffling-generator state
  (``torch.save`` of tensors and plain values only, written atomically, read back with
  ``torch.load(..., weights_only=True)``), so ``--resume`` continues after the last finished epoch
  and ends with the same weights as an uninterrupted run;
- ``tb/``: ``train/loss`` (mean MSE of the epoch) and ``train/epoch_seconds`` per epoch;
- ``evaluations.csv`` (and ``eval/<site>/...`` in TensorBoard) every ``eval.every`` epochs and at
  the end, at ``eval.sites`` on the held-out seeds ``eval.seed + i``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loopsim.atomic import atomic_open
from loopsim.config import BCTrainConfig, ConfigError, TrainConfig

__all__ = ["RESUME_FILE", "check_bc_config", "select_episodes", "train_bc"]

#: Name of the resume state inside ``run.resume_dir``.
RESUME_FILE = "bc_state.pt"


def select_episodes(union: Any, train: BCTrainConfig) -> np.ndarray:
    """The global episode indices of ``union`` that ``train`` uses.

    Successful episodes only if ``train.success_only``; then the first ``train.max_episodes`` of
    those (in global order: through the stores in the order given).

    Args:
        union: A :class:`~loopsim.datasets.sampling.StoreUnion`.
        train: The BC training settings.

    Returns:
        ``(K,)`` int64 ascending global indices.
    """
    chosen = (union.select(success=True) if train.success_only
              else np.arange(len(union), dtype=np.int64))
    if train.max_episodes is not None:
        chosen = chosen[:train.max_episodes]
    return np.asarray(chosen, dtype=np.int64)


def check_bc_config(config: TrainConfig) -> None:
    """Check the stores of a BC config before any work starts.

    Opens every store in ``train.stores`` read-only and compares it with the env the config
    builds (``env.id`` with ``env.kwargs``).

    Args:
        config: A config with ``policy.type: bc``.

    Raises:
        ConfigError: Naming ``train.device`` if it is ``cuda`` without CUDA. Naming ``train.stores``
            (or ``train.action_key`` / ``train.success_only``) and the value, if a store is missing or
            not a readable loopsim store, records another env id, has observation or action spaces
            different from the env's, lacks the ``expert_action`` extra that
            ``train.action_key: expert_action`` needs, or if no episode is left after
            ``success_only`` and ``max_episodes``.
    """
    from loopsim.datasets import EpisodeStore
    from loopsim.datasets.sampling import StoreUnion
    from loopsim.datasets.schema import StoreError

    train = config.train
    if not isinstance(train, BCTrainConfig):  # pragma: no cover - the config model pairs them
        raise ConfigError(f"train settings of type {train.type!r} are not BC settings")
    if train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda': CUDA is not available here; allowed: cpu, auto (CUDA if "
                          "available, else CPU)")
    env = config.env.make()
    try:
        obs_space, act_space = env.observation_space, env.action_space
    finally:
        env.close()
    stores = []
    try:
        for url in train.stores:
            where = f"train.stores: {url!r}"
            try:
                store = EpisodeStore.open(url, mode="r")
            except FileNotFoundError:
                raise ConfigError(f"{where} does not exist") from None
            except (StoreError, OSError, ValueError) as exc:
                raise ConfigError(f"{where} is not a readable loopsim episode store: {exc}") from None
            stores.append(store)
            if store.env_id != config.env.id:
                recorded = store.env_id or "(no env id)"
                raise ConfigError(f"{where} holds episodes of {recorded!r}, but env.id is {config.env.id!r}")
            for what, mine in (("observation_space", obs_space), ("action_space", act_space)):
                theirs = getattr(store, what)
                if theirs != mine:
                    raise ConfigError(
                        f"{where} has {what.replace('_', ' ')} {theirs}, but {config.env.id} with "
                        f"env.kwargs = {dict(config.env.kwargs)} has {mine} (the store was made with "
                        f"env kwargs {store.env_kwargs})")
            if train.action_key != "action" and train.action_key not in store.step_extras:
                raise ConfigError(f"{where} has no {train.action_key!r} step extra (it has "
                                  f"{store.step_extras}), which train.action_key = {train.action_key!r} "
                                  "needs; collect with expert_labels: true or use action_key: action")
        union = StoreUnion(stores)
        chosen = select_episodes(union, train)
        if len(chosen) == 0:
            raise ConfigError(f"train.stores: {list(train.stores)} hold no episodes to train on "
                              f"({len(union)} episodes, train.success_only = {train.success_only}, "
                              f"train.max_episodes = {train.max_episodes})")
    finally:
        for s in stores:
            s.close()


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _episodes_by_store(union: Any, chosen: np.ndarray, urls: list[str]) -> list[dict[str, Any]]:
    offsets = union.offsets
    out = []
    for k, url in enumerate(urls):
        local = chosen[(chosen >= offsets[k]) & (chosen < offsets[k + 1])] - offsets[k]
        path = Path(url)
        out.append({"url": url, "path": str(path.resolve()) if path.exists() else url,
                    "n_episodes": int(len(local)), "episodes": [int(i) for i in local]})
    return out


def _digest(stores: list[dict[str, Any]]) -> str:
    """sha256 of the chosen (store, episode) pairs: identifies the training data."""
    text = json.dumps([[s["url"], s["episodes"]] for s in stores], separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _content_digest(dataset: Any) -> str:
    """sha256 of every array the training reads (observations and actions, with shapes and dtypes).

    A store rewritten with other episodes under the same episode numbers has another digest.
    """
    h = hashlib.sha256()
    for key in sorted(dataset.arrays):
        a = np.ascontiguousarray(dataset.arrays[key])
        h.update(f"{key}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.data)
    return h.hexdigest()


def _save_state(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` to ``path`` atomically (temporary file, fsync, rename), readable by its owner only.

    The run directory's ``resume/`` state is private (SB3's is written in a 0700 folder); this file
    followed the umask (0644 under the usual 022).
    """
    with atomic_open(path, "wb", fsync=True) as f:
        if hasattr(os, "fchmod"):
            os.fchmod(f.fileno(), 0o600)
        torch.save(state, f)


def train_bc(config: TrainConfig, run: Any, resume: bool = False, progress_bar: bool = True) -> Any:
    """Train a BC policy as ``config`` says, writing checkpoints, logs and evaluations into ``run``.

    Torch uses ``train.num_threads`` CPU threads meanwhile (restored afterwards). Seeding:
    ``torch.manual_seed(config.seed)`` before the network is built (initial weights) and a
    ``torch.Generator`` seeded with ``config.seed`` for the order of the transitions in each epoch;
    nothing else is random, so the same config gives the same weights on the same machine.

    Args:
        config: A checked config with ``policy.type: bc`` (see :func:`check_bc_config`).
        run: The :class:`~loopsim.training.RunDir` (checkpoint, resume, TensorBoard, evaluation).
        resume: Continue after the last finished epoch recorded in ``run.resume_dir`` (from scratch if
            there is none).
        progress_bar: Show a progress bar over the epochs (and the evaluation episodes).

    Returns:
        The trained :class:`~loopsim.policies.BCPolicy` (also saved in ``run.checkpoint_dir``).

    Raises:
        loopsim.training.RunDirError: If ``resume`` and the stores no longer hold the episodes the run
            was trained on (they were changed since).
    """
    threads = torch.get_num_threads()
    if config.train.num_threads is not None:
        torch.set_num_threads(config.train.num_threads)
    try:
        return _train_bc(config, run, resume, progress_bar)
    finally:
        torch.set_num_threads(threads)


def _train_bc(config: TrainConfig, run: Any, resume: bool, progress_bar: bool) -> Any:
    from tqdm.auto import tqdm

    from loopsim.datasets.sampling import StoreUnion, TransitionDataset
    from loopsim.policies.bc import BCPolicy, BCTrainer, dataset_observations
    from loopsim.training import RunDirError

    train = config.train
    pcfg = config.policy
    device = _device(train.device)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    urls = [str(u) for u in train.stores]
    with StoreUnion.open(urls) as union:
        chosen = select_episodes(union, train)
        dataset = TransitionDataset(union, keys=["observation", train.action_key], episodes=chosen)
        stores_used = _episodes_by_store(union, chosen, urls)
        obs_space, act_space = union.observation_space, union.action_space
    digest = _digest(stores_used)
    content = _content_digest(dataset)

    policy = BCPolicy(obs_space, act_space, hidden_sizes=pcfg.hidden_sizes, activation=pcfg.activation,
                      cnn_channels=pcfg.cnn_channels)
    policy.fit_normalization(dataset_observations(dataset))
    policy.config = config.model_dump(mode="json")
    trainer = BCTrainer(policy, dataset, batch_size=train.batch_size, lr=train.lr,
                        weight_decay=train.weight_decay, generator=generator, device=device,
                        action_key=train.action_key)
    state_file = run.resume_dir / RESUME_FILE
    train_seconds, last_loss = 0.0, float("nan")
    if resume and state_file.exists():
        state = torch.load(state_file, map_location=device, weights_only=True)
        # data_digest names the episodes; content_digest their data (absent from older runs' states):
        # a store rewritten (mode=overwrite) with as many other episodes kept the numbers
        if state.get("data_digest") != digest or state.get("content_digest", content) != content:
            raise RunDirError(f"--resume: the stores {urls} no longer hold the episodes this run was trained "
                              "on (they changed since); start a new run")
        trainer.load_state_dict(state)
        train_seconds = float(state["train_seconds"])
        last_loss = float(state["loss"])

    def provenance() -> dict[str, Any]:
        return {"trainer": "bc", "stores": stores_used, "n_episodes": int(len(chosen)),
                "n_transitions": int(len(dataset)), "episodes_sha256": digest, "data_sha256": content,
                "action_key": train.action_key,
                "epochs": trainer.epoch, "train_seconds": round(train_seconds, 3),
                "final_loss": None if np.isnan(last_loss) else last_loss, "device": str(device)}

    ev = config.eval
    bar = tqdm(total=train.epochs, initial=min(trainer.epoch, train.epochs), desc="bc", unit="epoch",
               disable=not progress_bar, dynamic_ncols=True)

    def evaluate(epoch: int) -> None:
        n = len(ev.sites) * ev.episodes
        with tqdm(total=n, desc=f"eval @ epoch {epoch}", unit="ep", leave=False,
                  disable=not progress_bar, dynamic_ncols=True) as ebar:
            results = run.evaluate(policy, epoch, progress=lambda *_: ebar.update())
        bar.set_postfix(loss=f"{last_loss:.4g}", **{f"success@{s}": f"{r.success_rate:.0%}"
                                                    for s, r in results.items()})

    try:
        while trainer.epoch < train.epochs:
            stats = trainer.train_epoch()
            if not np.isfinite(stats.loss):
                from loopsim.training import TrainingDivergedError

                raise TrainingDivergedError(
                    f"training diverged at epoch {stats.epoch}: the loss is {stats.loss} (train.lr = "
                    f"{train.lr}); {run.path} keeps its checkpoint of the last finished epoch, if any: "
                    "lower train.lr and start a new run (another --run-dir, or delete this one)"
                )
            train_seconds += stats.seconds
            last_loss = stats.loss
            run.writer.add_scalar("train/loss", stats.loss, stats.epoch)
            run.writer.add_scalar("train/epoch_seconds", stats.seconds, stats.epoch)
            bar.update()
            bar.set_postfix(loss=f"{stats.loss:.4g}")
            if ev.every and stats.epoch % ev.every == 0 and stats.epoch < train.epochs:
                evaluate(stats.epoch)
            policy.provenance = provenance()
            policy.save(run.checkpoint_dir)
            _save_state(state_file, {**trainer.state_dict(), "train_seconds": train_seconds,
                                     "loss": stats.loss, "data_digest": digest, "content_digest": content})
        run.writer.flush()
        if not (run.checkpoint_dir / "policy.json").exists():  # resumed a finished run: keep it complete
            policy.provenance = provenance()
            policy.save(run.checkpoint_dir)
        evaluate(trainer.epoch)
    finally:
        bar.close()
    return policy
