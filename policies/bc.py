"""Behaviour cloning in torch: a deterministic policy regressed onto demonstrated actions.

:class:`BCPolicy` is the ``bc`` policy kind: a small network from observation to action, trained by
:class:`BCTrainer` (or :func:`fit_bc`) on the transitions of one or more episode stores
(:class:`~loopsim.datasets.TransitionDataset`). The choices follow the plain BC baselines of
robomimic (``BC`` with a Gaussian-free MLP head, Mandlekar et al. 2021, "What Matters in Learning
from Offline Human Demonstrations for Robot Manipulation") and LeRobot's normalised inputs:

- **Network.** ``state`` observations (a float Box): an MLP. ``rgb`` observations (a uint8 Box
  ``(H, W, C)``): a NatureCNN-like encoder (Mnih et al. 2015; convolutions 8x8 stride 4, 4x4 stride 2,
  then 3x3 stride 1, with ``cnn_channels`` output channels, ReLU, flattened) followed by the MLP.
  ``goal`` observations (a Dict of float Boxes, e.g. ``observation`` / ``achieved_goal`` /
  ``desired_goal``): every key flattened and concatenated in sorted key order, then the MLP.
- **Observation normalisation.** Float features are standardised, ``(x - mean) / std``, with the
  mean and std of the training observations (:meth:`BCPolicy.fit_normalization`), then clipped to
  ``[-obs_clip, obs_clip]`` (10 by default, as SB3's ``VecNormalize``). A feature whose std is below
  ``min_std`` (1e-4, in the feature's units) is only centred (its std is set to 1): a feature that is
  constant in the demonstrations (a fixed bin position, the conveyor speed at ``lab``) is then not
  blown up by a tiny std when it changes at another site (the same idea as diffusion_policy's
  ``range_eps``). Images are scaled by a fixed ``1 / 255``. The statistics are buffers of the
  network, so they are saved with the weights.
- **Output.** Box actions with finite bounds are squashed: ``low + (tanh(y) + 1) / 2 * (high - low)``,
  so every output is inside the action space. Unbounded dimensions are left linear.
- **Loss.** Mean squared error between the squashed output and the demonstrated action (clipped to
  the action bounds), i.e. the deterministic BC of robomimic's ``BC`` / LeRobot's MLP baselines.

The policy is deterministic: ``predict(..., deterministic=True)`` and ``deterministic=False`` give the
same action (there is no action noise to switch off).

Checkpoints (see :mod:`loopsim.policies.checkpoint`) hold the architecture in ``policy.json`` and every
weight and normalisation statistic in ``weights.safetensors``; :func:`~loopsim.policies.load_policy`
rebuilds the policy in any process and gives bit-identical actions on the same device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from loopsim.policies.base import BasePolicy, register_policy
from loopsim.policies.checkpoint import CheckpointError

__all__ = ["ACTIVATIONS", "BCNetwork", "BCPolicy", "BCTrainer", "EpochStats", "dataset_observations",
           "fit_bc"]

#: Activation name -> module class (the names ``BCPolicyConfig.activation`` allows).
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "gelu": nn.GELU, "leaky_relu": nn.LeakyReLU,
}

#: (kernel, stride) of the CNN's convolution layers; layers beyond the list use the last entry.
_CNN_KERNELS: tuple[tuple[int, int], ...] = ((8, 4), (4, 2), (3, 1))


def _is_image(space: gym.Space) -> bool:
    """A uint8 Box of rank 3, ``(H, W, C)`` (loopsim's ``rgb`` observations)."""
    return isinstance(space, gym.spaces.Box) and space.dtype == np.uint8 and len(space.shape) == 3


def _is_float_box(space: gym.Space) -> bool:
    return isinstance(space, gym.spaces.Box) and np.issubdtype(space.dtype, np.floating)


def _check_spaces(observation_space: gym.Space, action_space: gym.Space) -> None:
    """Refuse spaces BC cannot handle.

    Raises:
        TypeError: For an action space other than a float Box, or an observation space other than
            a float Box, a uint8 image Box ``(H, W, C)``, or a Dict of float Boxes.
    """
    if not _is_float_box(action_space):
        raise TypeError(f"BC needs a float Box action space, got {action_space}")
    if _is_image(observation_space) or _is_float_box(observation_space):
        return
    if isinstance(observation_space, gym.spaces.Dict) and all(
            _is_float_box(s) for s in observation_space.spaces.values()):
        return
    raise TypeError(f"BC supports float Box, uint8 image Box (H, W, C) and Dict-of-float-Box observation "
                    f"spaces, got {observation_space}")


def _feature_dim(observation_space: gym.Space) -> int:
    """Length of the flattened float feature vector (0 for images)."""
    if _is_image(observation_space):
        return 0
    if isinstance(observation_space, gym.spaces.Dict):
        return sum(int(np.prod(observation_space[k].shape)) for k in sorted(observation_space.spaces))
    return int(np.prod(observation_space.shape))


class BCNetwork(nn.Module):
    """Observation -> action network of :class:`BCPolicy` (normalisation and squashing included).

    Args:
        observation_space: Float Box, uint8 image Box ``(H, W, C)``, or Dict of float Boxes.
        action_space: Float Box ``(*action_shape)``.
        hidden_sizes: Widths of the MLP's hidden layers.
        activation: A key of :data:`ACTIVATIONS`.
        cnn_channels: Output channels of the convolution layers (images only).
        obs_clip: Normalised features are clipped to ``[-obs_clip, obs_clip]``.

    Raises:
        TypeError: For unsupported spaces (see :class:`BCPolicy`).
        ValueError: For an unknown activation, or an image too small for the CNN.

    Buffers (saved with the weights):
        obs_mean, obs_std: ``(D,)`` float32 normalisation of the flattened float features (mean 0,
            std 1 until :meth:`BCPolicy.fit_normalization`); ``(0,)`` for images.
        act_low, act_high: ``(A,)`` float32 action bounds (flattened).
    """

    def __init__(self, observation_space: gym.Space, action_space: gym.Space, hidden_sizes: Sequence[int],
                 activation: str = "relu", cnn_channels: Sequence[int] = (32, 64, 64),
                 obs_clip: float = 10.0) -> None:
        super().__init__()
        _check_spaces(observation_space, action_space)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not one of {sorted(ACTIVATIONS)}")
        self.observation_space = observation_space
        self.action_shape = tuple(action_space.shape)
        self.image = _is_image(observation_space)
        self.dict_keys = (sorted(observation_space.spaces) if isinstance(observation_space, gym.spaces.Dict)
                          else [])
        self.obs_clip = float(obs_clip)
        act = ACTIVATIONS[activation]
        dim = _feature_dim(observation_space)
        self.register_buffer("obs_mean", torch.zeros(dim))
        self.register_buffer("obs_std", torch.ones(dim))
        if self.image:
            h, w, c = observation_space.shape
            layers: list[nn.Module] = []
            in_ch = c
            for i, out_ch in enumerate(cnn_channels):
                k, s = _CNN_KERNELS[min(i, len(_CNN_KERNELS) - 1)]
                layers += [nn.Conv2d(in_ch, int(out_ch), kernel_size=k, stride=s), nn.ReLU()]
                in_ch = int(out_ch)
            layers.append(nn.Flatten())
            self.encoder: nn.Module = nn.Sequential(*layers)
            with torch.no_grad():
                try:
                    dim = int(self.encoder(torch.zeros(1, c, h, w)).shape[1])
                except RuntimeError as exc:
                    raise ValueError(f"image observations of {h}x{w} px are too small for a CNN with "
                                     f"{len(cnn_channels)} layers ({exc}); use a larger image_size or "
                                     "fewer cnn_channels") from None
        else:
            self.encoder = nn.Identity()
        sizes = [dim, *[int(h) for h in hidden_sizes]]
        mlp: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            mlp += [nn.Linear(a, b), act()]
        mlp.append(nn.Linear(sizes[-1], int(np.prod(self.action_shape))))
        self.mlp = nn.Sequential(*mlp)
        low = np.asarray(action_space.low, dtype=np.float32).reshape(-1)
        high = np.asarray(action_space.high, dtype=np.float32).reshape(-1)
        self.register_buffer("act_low", torch.from_numpy(low.copy()))
        self.register_buffer("act_high", torch.from_numpy(high.copy()))
        self._bounded = torch.from_numpy(np.isfinite(low) & np.isfinite(high))

    def features(self, observation: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Flattened float features ``(B, D)`` of a batch (before normalisation); images unchanged."""
        if self.dict_keys:
            return torch.cat([observation[k].reshape(observation[k].shape[0], -1).float()
                              for k in self.dict_keys], dim=1)
        if self.image:
            return observation
        return observation.reshape(observation.shape[0], -1).float()

    def forward(self, observation: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Actions for a batch of raw observations.

        Args:
            observation: ``(B, *obs_shape)`` (uint8 ``(B, H, W, C)`` for images) or a dict of those.

        Returns:
            ``(B, *action_shape)`` float32 actions inside the bounds of the action space.
        """
        x = self.features(observation)
        if self.image:
            x = self.encoder(x.permute(0, 3, 1, 2).float() / 255.0)
        else:
            x = ((x - self.obs_mean) / self.obs_std).clamp(-self.obs_clip, self.obs_clip)
        y = self.mlp(x)
        squashed = self.act_low + (torch.tanh(y) + 1.0) * 0.5 * (self.act_high - self.act_low)
        y = torch.where(self._bounded.to(y.device), squashed, y)
        return y.reshape(y.shape[0], *self.action_shape)


@register_policy
class BCPolicy(BasePolicy):
    """Behaviour-cloning policy (kind ``bc``): a deterministic network regressed onto demo actions.

    See the module docstring for the architecture, normalisation, squashing and loss.

    Args:
        observation_space: Float Box (``state``), uint8 Box ``(H, W, C)`` (``rgb``) or a Dict of float
            Boxes (``goal``).
        action_space: Float Box.
        hidden_sizes: Widths of the MLP's hidden layers.
        activation: ``relu``, ``tanh``, ``elu``, ``gelu`` or ``leaky_relu``.
        cnn_channels: Output channels of the CNN's convolution layers (images only).
        obs_clip: Normalised float features are clipped to ``[-obs_clip, obs_clip]``.
        min_std: Features whose training std is below this are only centred (see the module docstring).

    Raises:
        TypeError: For unsupported spaces.
        ValueError: For an unknown activation, non-positive sizes, or an image too small for the CNN.

    Attributes:
        net: The :class:`BCNetwork` (in eval mode except while :class:`BCTrainer` trains it).
    """

    kind = "bc"

    def __init__(self, observation_space: gym.Space, action_space: gym.Space,
                 hidden_sizes: Sequence[int] = (256, 256), activation: str = "relu",
                 cnn_channels: Sequence[int] = (32, 64, 64), obs_clip: float = 10.0,
                 min_std: float = 1e-4) -> None:
        super().__init__(observation_space, action_space)
        for name, sizes in (("hidden_sizes", hidden_sizes), ("cnn_channels", cnn_channels)):
            if any(int(s) < 1 for s in sizes):
                raise ValueError(f"{name}={list(sizes)} must hold positive integers")
        if not (math.isfinite(obs_clip) and obs_clip > 0 and math.isfinite(min_std) and min_std >= 0):
            raise ValueError(f"need obs_clip > 0 and min_std >= 0, got {obs_clip}, {min_std}")
        self.hidden_sizes = [int(s) for s in hidden_sizes]
        self.activation = activation
        self.cnn_channels = [int(s) for s in cnn_channels]
        self.obs_clip = float(obs_clip)
        self.min_std = float(min_std)
        self.net = BCNetwork(observation_space, action_space, self.hidden_sizes, activation,
                             self.cnn_channels, self.obs_clip)
        self.net.eval()

    @property
    def device(self) -> torch.device:
        """The device the network is on."""
        return self.net.act_low.device

    # -------------------------------------------------------------------------------- normalisation
    def fit_normalization(self, observations: np.ndarray | torch.Tensor | Mapping[str, Any]) -> None:
        """Set the observation normalisation from training observations (no-op for images).

        Mean and std are computed in float64 per flattened feature; a std below :attr:`min_std` is
        replaced by 1 (the feature is only centred).

        Args:
            observations: ``(N, *obs_shape)`` array or tensor, or for a Dict space a mapping key ->
                ``(N, *shape)``; ``N >= 1``.

        Raises:
            ValueError: If there are no observations or they hold NaN/inf.
        """
        if self.net.image:
            return
        if isinstance(observations, Mapping):
            keys = sorted(observations)
            feats = np.concatenate([np.asarray(observations[k], dtype=np.float64).reshape(
                len(observations[k]), -1) for k in keys], axis=1)
        else:
            arr = np.asarray(observations, dtype=np.float64)
            feats = arr.reshape(len(arr), -1)
        if len(feats) == 0:
            raise ValueError("cannot fit the normalisation to zero observations")
        if not np.isfinite(feats).all():
            raise ValueError("training observations hold NaN or inf")
        mean = feats.mean(axis=0)
        std = feats.std(axis=0)
        std = np.where(std < self.min_std, 1.0, std)
        with torch.no_grad():
            self.net.obs_mean.copy_(torch.from_numpy(mean.astype(np.float32)))
            self.net.obs_std.copy_(torch.from_numpy(std.astype(np.float32)))

    # ------------------------------------------------------------------------------------------ acting
    def to_tensor(self, observation: Any) -> torch.Tensor | dict[str, torch.Tensor]:
        """A batch of observations (numpy or tensors, or a dict of them) as tensors on :attr:`device`."""
        if isinstance(observation, Mapping):
            return {k: torch.as_tensor(np.asarray(v) if not isinstance(v, torch.Tensor) else v,
                                       device=self.device) for k, v in observation.items()}
        if not isinstance(observation, torch.Tensor):
            observation = np.asarray(observation)
        return torch.as_tensor(observation, device=self.device)

    def _predict_batch(self, observation: Any, deterministic: bool) -> np.ndarray:
        """Actions ``(B, *action_shape)`` float32; the same for ``deterministic`` True and False."""
        was_training = self.net.training
        self.net.eval()
        try:
            with torch.no_grad():
                return self.net(self.to_tensor(observation)).cpu().numpy().astype(np.float32, copy=False)
        finally:
            self.net.train(was_training)

    # ------------------------------------------------------------------------------------- checkpoints
    def _checkpoint_policy(self) -> dict[str, Any]:
        return {"hidden_sizes": self.hidden_sizes, "activation": self.activation,
                "cnn_channels": self.cnn_channels, "obs_clip": self.obs_clip, "min_std": self.min_std,
                "encoder": "cnn" if self.net.image else "flat", "dict_keys": self.net.dict_keys}

    def _checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.net.state_dict().items()}

    @classmethod
    def _from_checkpoint(cls, observation_space: gym.Space, action_space: gym.Space,
                         policy: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> BCPolicy:
        try:
            bc = cls(observation_space, action_space, hidden_sizes=policy["hidden_sizes"],
                     activation=policy["activation"], cnn_channels=policy["cnn_channels"],
                     obs_clip=policy.get("obs_clip", 10.0), min_std=policy.get("min_std", 1e-4))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"the bc policy settings in the checkpoint are damaged ({exc!r})") from None
        try:
            bc.net.load_state_dict(dict(tensors), strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"the bc checkpoint's weights do not fit its architecture: {exc}") from None
        bc.net.eval()
        return bc


# ================================================================================================ training
@dataclass(frozen=True)
class EpochStats:
    """What one training epoch did.

    Attributes:
        epoch: Epochs finished so far (1 after the first).
        loss: Mean MSE loss over the epoch's transitions [action units squared].
        batches: Gradient steps taken in the epoch.
        seconds: Wall time of the epoch [s].
    """

    epoch: int
    loss: float
    batches: int
    seconds: float


class BCTrainer:
    """Fits a :class:`BCPolicy` to a transition dataset with Adam and MSE, one epoch at a time.

    Each epoch visits every transition once in an order drawn from ``generator``
    (``torch.randperm``), in batches of ``batch_size`` (the last one may be smaller). The trainer's
    full state (network, optimizer, generator, epochs done) is :meth:`state_dict`, so an interrupted
    run restored with :meth:`load_state_dict` ends with bit-identical weights.

    Args:
        policy: The policy to train (its normalisation should already be fitted).
        dataset: A :class:`~loopsim.datasets.TransitionDataset` (or anything with ``len`` and
            ``get_batch(indices) -> {"observation": ..., action_key: (B, *action_shape)}``).
        batch_size: Transitions per gradient step (>= 1).
        lr: Adam learning rate (> 0).
        weight_decay: Adam weight decay (L2, >= 0).
        generator: Source of the shuffling; default a generator seeded with 0.
        device: Torch device to train on (the network is moved there).
        action_key: The dataset key of the regression targets: ``"action"`` (the actions taken) or
            ``"expert_action"`` (the expert's label of each visited state).
        max_grad_norm: Clip the gradient's global L2 norm to this before each step (``None``: no
            clipping), as in SB3's ``max_grad_norm``; guards against a single bad step.

    Raises:
        ValueError: For an empty dataset or a bad batch size / learning rate / weight decay.
    """

    def __init__(self, policy: BCPolicy, dataset: Any, *, batch_size: int = 256, lr: float = 1e-3,
                 weight_decay: float = 0.0, generator: torch.Generator | None = None,
                 device: str | torch.device = "cpu", action_key: str = "action",
                 max_grad_norm: float | None = None) -> None:
        if len(dataset) < 1:
            raise ValueError("cannot train on an empty dataset")
        if int(batch_size) < 1 or not lr > 0 or not weight_decay >= 0:
            raise ValueError(f"need batch_size >= 1, lr > 0, weight_decay >= 0; got {batch_size}, {lr}, "
                             f"{weight_decay}")
        self.policy = policy
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.action_key = action_key
        if max_grad_norm is not None and not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm={max_grad_norm!r} must be a finite number > 0 or None")
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.device = torch.device(device)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        policy.net.to(self.device)
        self.optimizer = torch.optim.Adam(policy.net.parameters(), lr=float(lr),
                                          weight_decay=float(weight_decay))
        self.epoch = 0

    def train_epoch(self) -> EpochStats:
        """One pass over the dataset; returns its :class:`EpochStats`."""
        start = time.perf_counter()
        net = self.policy.net
        net.train()
        n = len(self.dataset)
        order = torch.randperm(n, generator=self.generator)
        total, batches = 0.0, 0
        try:
            for lo in range(0, n, self.batch_size):
                idx = order[lo:lo + self.batch_size]
                batch = self.dataset.get_batch(idx.numpy())
                obs = self.policy.to_tensor(batch["observation"])
                target = torch.as_tensor(batch[self.action_key], device=self.device).float()
                target = torch.maximum(torch.minimum(target, net.act_high.reshape(net.action_shape)),
                                       net.act_low.reshape(net.action_shape))
                loss = torch.mean((net(obs) - target) ** 2)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(net.parameters(), self.max_grad_norm)
                self.optimizer.step()
                total += float(loss.detach()) * len(idx)
                batches += 1
        finally:
            net.eval()
        self.epoch += 1
        return EpochStats(self.epoch, total / n, batches, time.perf_counter() - start)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue training: ``{epoch, model, optimizer, generator}`` (tensors only)."""
        return {"epoch": self.epoch, "model": self.policy.net.state_dict(),
                "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (network weights and normalisation, optimizer, generator, epoch).

        Raises:
            KeyError: If ``state`` lacks a part.
            RuntimeError: If the weights do not fit the network.
        """
        self.policy.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.epoch = int(state["epoch"])


def fit_bc(policy: BCPolicy, dataset: Any, *, epochs: int, batch_size: int = 256, lr: float = 1e-3,
           weight_decay: float = 0.0, generator: torch.Generator | None = None,
           device: str | torch.device = "cpu", action_key: str = "action", fit_normalization: bool = True,
           on_epoch: Callable[[EpochStats], None] | None = None) -> list[EpochStats]:
    """Fit ``policy`` to ``dataset`` for ``epochs`` epochs (a convenience around :class:`BCTrainer`).

    Args:
        policy: The policy to train.
        dataset: A :class:`~loopsim.datasets.TransitionDataset` holding ``observation`` and the
            ``action_key`` targets.
        epochs: Passes over the dataset (>= 1).
        batch_size: Transitions per gradient step.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        generator: Source of the shuffling (default seeded with 0).
        device: Torch device to train on.
        action_key: ``"action"`` or ``"expert_action"`` (see :class:`BCTrainer`).
        fit_normalization: First set the normalisation from the dataset's observations
            (:func:`dataset_observations`).
        on_epoch: Called with each epoch's :class:`EpochStats`.

    Returns:
        The stats of every epoch, in order.

    Raises:
        ValueError: For ``epochs < 1`` or the errors of :class:`BCTrainer`.
    """
    if int(epochs) < 1:
        raise ValueError(f"epochs={epochs} must be >= 1")
    if fit_normalization:
        policy.fit_normalization(dataset_observations(dataset))
    trainer = BCTrainer(policy, dataset, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                        generator=generator, device=device, action_key=action_key)
    stats = []
    for _ in range(int(epochs)):
        s = trainer.train_epoch()
        stats.append(s)
        if on_epoch is not None:
            on_epoch(s)
    return stats


def dataset_observations(dataset: Any) -> np.ndarray | dict[str, np.ndarray]:
    """All observation rows a :class:`~loopsim.datasets.TransitionDataset` holds (for normalisation).

    Returns:
        ``(N + E, *obs_shape)`` (every stored observation row of the held episodes, each episode's
        final observation included), or a dict key -> array for a Dict space.
    """
    arrays = dataset.arrays
    if "observation" in arrays:
        return arrays["observation"]
    return {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("observation/")}
