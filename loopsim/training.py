"""``loopsim train``: run directories, periodic evaluation, and the dispatch to SB3 or BC training.

A run directory::

    <run_dir>/
        config.yaml          # the resolved config (every default filled in)
        checkpoint/          # the deployable policy (loopsim checkpoint: policy.json + weights.safetensors)
        evaluations.csv      # one row per (evaluation, site): step, site, episodes, success rate and its
                             # 95% bootstrap interval, mean return and its interval
        tb/                  # TensorBoard event files
        resume/              # private resume state (optimizer, SB3 model and replay buffer files)
        done                 # written when training finished
        .loopsim-train.lock  # held by the process training into it (one at a time)

``--resume`` continues a run from ``resume/`` with the same resolved config (overrides given with
``--resume`` must leave it unchanged); without ``--resume`` an existing run directory is refused.
"""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from loopsim.atomic import atomic_open, atomic_write
from loopsim.config import ConfigError, TrainConfig, check_env_config, dump_config

__all__ = ["RunDir", "RunDirError", "TrainingDivergedError", "train"]

#: The lock a training process holds in its run directory (see :meth:`RunDir.start`).
LOCK_NAME = ".loopsim-train.lock"


class RunDirError(Exception):
    """A run directory exists when it should not, or is not a run of this config."""


class TrainingDivergedError(RuntimeError):
    """Training produced NaN or infinite losses or weights (e.g. a learning rate far too high).

    Raised before a checkpoint of the diverged policy is written: the run directory keeps its last
    good checkpoint and resume state.
    """


_EVAL_FIELDS = [
    "step",
    "site",
    "episodes",
    "success_rate",
    "success_low",
    "success_high",
    "mean_return",
    "return_low",
    "return_high",
    "mean_length",
]


class RunDir:
    """A training run's directory (see the module docstring for the layout).

    Args:
        path: The directory.
        config: The resolved training config.

    Attributes:
        path: The directory.
        config: The config.
        checkpoint_dir: ``path / "checkpoint"`` (deployable checkpoint).
        resume_dir: ``path / "resume"`` (private resume state; trainers own its contents).
        tb_dir: ``path / "tb"`` (TensorBoard logs).
    """

    def __init__(self, path: str | os.PathLike, config: TrainConfig) -> None:
        self.path = Path(path)
        self.config = config
        self.checkpoint_dir = self.path / "checkpoint"
        self.resume_dir = self.path / "resume"
        self.tb_dir = self.path / "tb"
        self._writer: Any = None
        self._lock: Any = None

    # ------------------------------------------------------------------------------------ lifecycle
    @classmethod
    def start(cls, path: str | os.PathLike, config: TrainConfig, resume: bool) -> RunDir:
        """Create a new run directory, or reopen one to resume.

        The process then holds the directory's lock (``.loopsim-train.lock``, released by
        :meth:`close`): a second ``loopsim train`` into it, with or without ``--resume``, is refused
        while the first runs (two writers renamed checkpoints and resume states under each other and
        killed each other's runs).

        Raises:
            RunDirError: If ``path`` exists and ``resume`` is False, or ``resume`` is True and ``path``
                holds no run or a run of a different config (the difference is named), or another
                process is training into ``path``.
        """
        from loopsim.runlock import acquire_or_refuse

        run = cls(path, config)
        config_file = run.path / "config.yaml"
        text = dump_config(config)
        if resume:
            if not config_file.is_file():
                raise RunDirError(f"--resume: {run.path} holds no run (no config.yaml)")
            run._lock = acquire_or_refuse(run.path, LOCK_NAME, "loopsim train", "--run-dir", RunDirError)
            try:
                try:
                    saved = yaml.safe_load(config_file.read_text(encoding="utf-8"))
                except (yaml.YAMLError, UnicodeDecodeError) as exc:
                    raise RunDirError(f"--resume: {config_file} cannot be read: {exc}") from None
                if not isinstance(saved, dict):
                    raise RunDirError(f"--resume: {config_file} holds no config (got {type(saved).__name__})")
                changes = config_changes(saved, yaml.safe_load(text), RESULT_NEUTRAL_KEYS)
                if changes:
                    raise RunDirError(
                        f"--resume: the config differs from the run's config.yaml ({'; '.join(changes)}); "
                        "resume with the same config and overrides"
                    )
            except BaseException:
                run.close()
                raise
            return run
        if run.path.exists() and any(e.name != LOCK_NAME for e in run.path.iterdir()):
            if (run.path / LOCK_NAME).exists():  # in use: "pass --resume" would be refused as well
                acquire_or_refuse(run.path, LOCK_NAME, "loopsim train", "--run-dir", RunDirError).release()
            if not config_file.is_file():  # "pass --resume" would say "holds no run"
                raise RunDirError(
                    f"{run.path} exists and is not a loopsim run (no config.yaml); choose another with "
                    "--run-dir / run_dir=..."
                )
            raise _exists(run.path)
        run.path.mkdir(parents=True, exist_ok=True)
        run._lock = acquire_or_refuse(run.path, LOCK_NAME, "loopsim train", "--run-dir", RunDirError)
        try:
            if any(e.name != LOCK_NAME for e in run.path.iterdir()):  # another run started first
                raise _exists(run.path)
            atomic_write(config_file, text)
        except BaseException:
            run.close()
            raise
        return run

    @property
    def finished(self) -> bool:
        """True once :meth:`mark_done` ran."""
        return (self.path / "done").exists()

    def mark_done(self) -> None:
        """Record that training finished."""
        (self.path / "done").write_text("done\n", encoding="utf-8")

    @property
    def writer(self) -> Any:
        """A TensorBoard ``SummaryWriter`` on :attr:`tb_dir` (created on first use)."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.tb_dir))
        return self._writer

    def close(self) -> None:
        """Flush and close the TensorBoard writer; release the run directory's lock (if held)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # ----------------------------------------------------------------------------------- evaluation
    def evaluate(
        self, policy: Any, step: int, progress: Callable[[Any], None] | None = None
    ) -> dict[str, Any]:
        """Evaluate ``policy`` at every ``config.eval.sites`` site and log the results.

        Episode ``i`` at every site uses seed ``eval.seed + i``; results go to ``evaluations.csv``
        (rows of the same ``step``, from an interrupted run, are replaced; rows stay in step order)
        and TensorBoard (``eval/<site>/success_rate``, ``eval/<site>/mean_return``).

        Args:
            policy: A :class:`~loopsim.policies.BasePolicy`.
            step: Training progress (env steps for ``sb3``, epochs for ``bc``).
            progress: Called with each episode's :class:`~loopsim.evaluation.EpisodeResult`.

        Returns:
            ``{site: EvaluationResult}`` (see :func:`loopsim.rollout.evaluate_policy`).
        """
        from loopsim.rollout import evaluate_policy

        ev = self.config.eval
        results = evaluate_policy(
            policy,
            self.config.env,
            sites=ev.sites,
            episodes=ev.episodes,
            seed=ev.seed,
            workers=ev.workers,
            deterministic=ev.deterministic,
            on_episode=progress,
        )
        rows = []
        for site, res in results.items():
            row = {
                "step": int(step),
                "site": site,
                "episodes": res.n,
                "success_rate": res.success_rate,
                "success_low": res.success_ci[0],
                "success_high": res.success_ci[1],
                "mean_return": res.mean_return,
                "return_low": res.return_ci[0],
                "return_high": res.return_ci[1],
                "mean_length": res.mean_length,
            }
            rows.append(row)
            self.writer.add_scalar(f"eval/{site}/success_rate", res.success_rate, int(step))
            self.writer.add_scalar(f"eval/{site}/mean_return", res.mean_return, int(step))
        self.writer.flush()
        self._append_evaluations(rows)
        return results

    def _append_evaluations(self, rows: list[dict[str, Any]]) -> None:
        path = self.path / "evaluations.csv"
        old: list[dict[str, Any]] = []
        if path.exists():
            with open(path, newline="", encoding="utf-8") as f:
                old = [r for r in csv.DictReader(f) if not rows or int(r["step"]) != rows[0]["step"]]
        merged = sorted(old + rows, key=lambda r: int(r["step"]))  # stable: site order kept within a step
        with atomic_open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=_EVAL_FIELDS)
            w.writeheader()
            w.writerows(merged)

    def evaluations(self) -> list[dict[str, Any]]:
        """The rows of ``evaluations.csv`` (numbers parsed), oldest first."""
        path = self.path / "evaluations.csv"
        if not path.exists():
            return []
        with open(path, newline="", encoding="utf-8") as f:
            return [
                {
                    k: (v if k == "site" else float(v) if "." in v or "e" in v else int(v))
                    for k, v in r.items()
                }
                for r in csv.DictReader(f)
            ]

    def clear_resume_state(self) -> None:
        """Delete the private resume state (after a finished run, to save space)."""
        shutil.rmtree(self.resume_dir, ignore_errors=True)


def _exists(path: Path) -> RunDirError:
    """The refusal of a new run into the run directory ``path`` that another run already holds."""
    return RunDirError(
        f"run directory {path} already exists; pass --resume to continue it, or choose another with "
        "--run-dir / run_dir=..."
    )


#: Training config keys that do not change a run's results: where its directory is (``run_dir=`` or
#: ``--run-dir``, spelled any way), and how many processes run its evaluation episodes (they come back
#: in seed order). ``--resume`` accepts other values for them.
RESULT_NEUTRAL_KEYS = ("run_dir", "eval.workers")


def _value_at(config: Any, key: str) -> Any:
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def config_changes(saved: Any, current: Any, ignore: Sequence[str] = ()) -> list[str]:
    """How a config differs from a run's saved one, key by key, with both values.

    Args:
        saved: The run's ``config.yaml``, as loaded by YAML.
        current: This config, dumped and loaded the same way.
        ignore: Dotted keys left out (those that do not change results).

    Returns:
        One ``"key: <saved> in the run, <current> now"`` per differing key (sorted); empty if none.
    """
    return [f"{key}: {_value_at(saved, key)!r} in the run, {_value_at(current, key)!r} now"
            for key in sorted(_diff(saved, current)) if key not in ignore]


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in set(a) | set(b):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def default_run_dir(config_path: str | os.PathLike | None, config: TrainConfig) -> Path:
    """``config.run_dir`` if set, else ``runs/<config file stem>`` (``runs/train`` without a file)."""
    if config.run_dir:
        return Path(config.run_dir)
    stem = Path(config_path).stem if config_path else "train"
    return Path("runs") / stem


def train(
    config: TrainConfig, run_dir: str | os.PathLike, resume: bool = False, progress_bar: bool = True
) -> RunDir:
    """Train the configured policy into ``run_dir`` (see the module docstring for its layout).

    Checks the env, its site and the evaluation sites first (building the env once), then hands over
    to :func:`loopsim.train_sb3.train_sb3` or :func:`loopsim.train_bc.train_bc`.

    Args:
        config: The resolved config.
        run_dir: The run directory.
        resume: Continue an interrupted run in ``run_dir``.
        progress_bar: Show progress bars.

    Returns:
        The finished run directory.

    Raises:
        ConfigError: If the env, a site or a store in the config is unusable.
        RunDirError: See :meth:`RunDir.start`.
    """
    check_env_config(config.env, config.eval.sites)
    if config.policy.type == "bc":
        from loopsim.train_bc import check_bc_config, train_bc

        check_bc_config(config)
        run = RunDir.start(run_dir, config, resume)
        try:
            train_bc(config, run, resume=resume, progress_bar=progress_bar)
            run.mark_done()
        finally:
            run.close()
    elif config.policy.type == "sb3":
        from loopsim.train_sb3 import check_sb3_config, train_sb3

        check_sb3_config(config)
        run = RunDir.start(run_dir, config, resume)
        threads = torch.get_num_threads()
        if config.train.num_threads is not None:
            torch.set_num_threads(config.train.num_threads)
        try:
            train_sb3(config, run, resume=resume, progress_bar=progress_bar)
            run.mark_done()
        finally:
            torch.set_num_threads(threads)
            run.close()
    else:  # pragma: no cover - the config model allows only these
        raise ConfigError(f"policy.type {config.policy.type!r} cannot be trained")
    return run
