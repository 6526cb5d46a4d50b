"""Policy networks shared by the meta-RL algorithms and by :func:`load_meta_policy`, and the
Gaussian densities MAML-RL's losses are written with.

Plain ``torch.nn`` modules (no RLlib import), so an exported meta-policy loads anywhere.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class GaussianMLPPolicy(nn.Module):
    """π(a|s) = N(MLP(s), diag(exp(log_std))²), state-independent log std (Finn et al. 2017)."""

    def __init__(self, observation_size: int, action_size: int, hidden: list[int],
                 init_log_std: float = 0.0):
        super().__init__()
        sizes = [observation_size, *hidden]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.head = nn.Linear(sizes[-1], action_size)
        self.log_std = nn.Parameter(torch.full((action_size,), float(init_log_std)))

    def forward(self, observation: Tensor) -> tuple[Tensor, Tensor]:
        hidden = observation
        for layer in self.layers:
            hidden = torch.relu(layer(hidden))
        return self.head(hidden), self.log_std.expand(observation.shape[:-1] + self.log_std.shape)


def gaussian_log_prob(mean: Tensor, log_std: Tensor, action: Tensor) -> Tensor:
    """log N(action; mean, exp(log_std)²), summed over the action axis."""
    z = (action - mean) / log_std.exp()
    return (-0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def gaussian_kl(mean_p: Tensor, log_std_p: Tensor, mean_q: Tensor, log_std_q: Tensor) -> Tensor:
    """KL(N(mean_p, σ_p²) ‖ N(mean_q, σ_q²)) of diagonal Gaussians, summed over the action axis."""
    var_p, var_q = (2 * log_std_p).exp(), (2 * log_std_q).exp()
    return (log_std_q - log_std_p + (var_p + (mean_p - mean_q) ** 2) / (2 * var_q) - 0.5).sum(-1)


def expand_params(params: dict[str, Tensor], tasks: int) -> dict[str, Tensor]:
    """Shared parameters as per-task ones ``[tasks, ...]`` (a view: no copy)."""
    return {name: value.unsqueeze(0).expand(tasks, *value.shape) for name, value in params.items()}


class RecurrentPolicy(nn.Module):
    """RL²'s policy (Duan et al. 2016): an LSTM over [obs, prev action, prev reward, done]
    followed by a policy head (categorical logits, or Gaussian means + log std) and a value
    head. ``step`` keeps the hidden state across episodes of a trial."""

    def __init__(self, input_size: int, action_size: int, hidden_size: int, discrete: bool):
        super().__init__()
        self.discrete = discrete
        self.hidden_size = hidden_size
        self.lstm = nn.LSTM(input_size, hidden_size, batch_first=True)
        self.pi = nn.Linear(hidden_size, action_size if discrete else 2 * action_size)
        self.value = nn.Linear(hidden_size, 1)

    def initial_state(self, batch: int = 1) -> tuple[Tensor, Tensor]:
        zeros = torch.zeros(batch, self.hidden_size)
        return zeros, zeros.clone()

    def forward(self, observations: Tensor, state: tuple[Tensor, Tensor]):
        """``observations`` [B, T, input]; ``state`` ([B, H], [B, H]) → (dist inputs [B, T, ·],
        values [B, T], new state)."""
        hidden, (h, c) = self.lstm(observations, (state[0].unsqueeze(0), state[1].unsqueeze(0)))
        return self.pi(hidden), self.value(hidden).squeeze(-1), (h.squeeze(0), c.squeeze(0))
