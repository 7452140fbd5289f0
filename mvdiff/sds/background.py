"""Background models for SDS and reconstruction renders (selected by ``BackgroundConfig.mode``).

* ``solid``: one colour (``color``); with probability ``random_prob`` per step it is replaced
  by a random colour (augmentation: a field cannot explain a changing background with
  density, so empty space stays empty).
* ``env``: a small MLP from the ray direction to a colour (an environment map learnt with the
  field); the same ``random_prob`` augmentation applies.

:meth:`Background.sample` returns either a tensor of colours or a callable that maps ray
directions ``[N, 3]`` to colours ``[N, 3]``; :func:`mvdiff.sds.render.render` accepts both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn

__all__ = ["Background", "BackgroundConfig", "EnvironmentMap"]


@dataclass
class BackgroundConfig:
    #: "solid" (a colour) or "env" (direction -> colour MLP, trained with the field)
    mode: Literal["solid", "env"] = "solid"
    color: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    #: probability per step of a random solid colour instead (augmentation; 0 = off)
    random_prob: float = 0.5
    env_hidden: int = 16
    env_frequencies: int = 2


class EnvironmentMap(nn.Module):
    """Unit directions ``[N, 3]`` -> colours ``[N, 3]`` in [0, 1] via sin/cos features + MLP."""

    def __init__(self, hidden: int = 16, frequencies: int = 2):
        super().__init__()
        self.frequencies = int(frequencies)
        in_dim = 3 + 6 * self.frequencies
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, 3))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.constant_(self.mlp[2].bias, 2.0)  # starts near white (sigmoid(2) = 0.88)

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        feats = [d]
        for k in range(self.frequencies):
            feats += [torch.sin(d * (math.pi * 2**k)), torch.cos(d * (math.pi * 2**k))]
        return torch.sigmoid(self.mlp(torch.cat(feats, dim=-1)))  # (N, 3 + 6K) -> (N, 3)


class Background(nn.Module):
    """The configured background; its parameters (``env`` mode) are trained with the field."""

    def __init__(self, config: BackgroundConfig | None = None):
        super().__init__()
        self.config = config = config or BackgroundConfig()
        if config.mode not in ("solid", "env"):
            raise ValueError(f"background.mode must be 'solid' or 'env', got {config.mode!r}")
        if len(config.color) != 3:
            raise ValueError(f"background.color must have 3 values, got {config.color!r}")
        self.env = (
            EnvironmentMap(config.env_hidden, config.env_frequencies)
            if config.mode == "env"
            else None
        )

    def sample(
        self,
        num: int,
        generator: torch.Generator | None = None,
        training: bool = True,
        per_item: bool = False,
    ):
        """The background of one step: colours ``[num, 3]`` or the environment map (callable).

        ``training`` enables the random-colour augmentation; ``per_item`` draws an
        independent random colour per item (rays) instead of one shared by all (views).
        """
        p = self.config.random_prob if training else 0.0
        if p > 0 and float(torch.rand((), generator=generator)) < p:
            n = num if per_item else 1
            return torch.rand(n, 3, generator=generator).expand(num, 3)  # (1|N, 3) -> (N, 3)
        if self.env is not None:
            return self.env
        return torch.tensor(self.config.color, dtype=torch.float32).expand(num, 3)  # (3,) -> (N, 3)
