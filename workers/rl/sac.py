"""PEARL's RL half: soft actor-critic (Haarnoja et al. 2018) conditioned on the task variable z.

Twin Q(s, a, z) with soft-updated targets (rate ``tau``); the tanh-Gaussian policy π(a | s, z)
of the agent; the temperature α tuned to ``target_entropy`` (or fixed); rewards scaled by
``reward_scale``. z is detached for the actor and the targets; the critic's loss carries the
encoder's KL term (and, if ``reward_loss_weight``, a reward decoder's loss), so one optimizer
steps the critics, the encoder and the decoder together, as in Rakelly et al. 2019.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from metaserve.workers.rl.pearl_agent import ACTION_SIZE, OBSERVATION_SIZE, PEARLAgent, mlp
from metaserve.workers.rl.replay import Transitions
from metaserve.workers.spec import PEARLSpec


class SAC:
    """The critics, targets, temperature and optimizers of PEARL's SAC (see the module
    docstring); build it under the job's seed: the critics' initial weights come from the
    global generator, after the agent's."""

    def __init__(self, agent: PEARLAgent, config: PEARLSpec):
        self.agent, self.config = agent, config
        critic_in = OBSERVATION_SIZE + ACTION_SIZE + config.latent_dim
        self.critics = nn.ModuleList(mlp([critic_in, config.hidden, config.hidden, 1]) for _ in range(2))
        self.reward_decoder = mlp([critic_in, config.hidden, config.hidden, 1])
        self.targets = [mlp([critic_in, config.hidden, config.hidden, 1]) for _ in range(2)]
        for target, critic in zip(self.targets, self.critics):
            target.load_state_dict(critic.state_dict())
        self.policy_optimizer = torch.optim.Adam(agent.policy.parameters(), lr=config.lr)
        self.log_alpha = torch.tensor(math.log(config.temperature), requires_grad=config.learn_temperature)
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], lr=config.lr)
        self.critic_optimizer = torch.optim.Adam(
            [*self.critics.parameters(), *agent.encoder.parameters(),
             *self.reward_decoder.parameters()], lr=config.lr)

    def modules(self) -> dict[str, nn.Module]:
        return {"critic0": self.critics[0], "critic1": self.critics[1],
                "target0": self.targets[0], "target1": self.targets[1],
                "reward_decoder": self.reward_decoder}

    def optimizers(self) -> tuple[tuple[str, torch.optim.Optimizer], ...]:
        return (("policy", self.policy_optimizer), ("critic", self.critic_optimizer),
                ("temperature", self.alpha_optimizer))

    def _min_q(self, networks, observations: Tensor, actions: Tensor, z: Tensor) -> Tensor:  # noqa: ANN001
        inputs = torch.cat([observations, actions, z], -1)
        return torch.minimum(*(network(inputs).squeeze(-1) for network in networks))

    def step(self, batch: Transitions, z: Tensor, kl: Tensor, generator: torch.Generator) -> dict[str, float]:
        """One gradient step of the critics (with the encoder's ``kl`` term), the policy and the
        temperature, then the targets' soft update. ``batch`` [T, n, ·] of ``T`` tasks, ``z``
        [T, n, latent] (reparameterized: the critic's loss trains the encoder through it)."""
        config = self.config
        alpha = self.log_alpha.detach().exp()
        z_fixed = z.detach()
        with torch.no_grad():
            next_action, next_log_prob = self.agent.act(batch.next_observations, z_fixed, generator=generator)
            next_q = self._min_q(self.targets, batch.next_observations, next_action, z_fixed) - alpha * next_log_prob
            target = config.reward_scale * batch.rewards + config.gamma * (1 - batch.dones) * next_q
        critic_in = torch.cat([batch.observations, batch.actions, z], -1)
        critic_loss = sum(((critic(critic_in).squeeze(-1) - target) ** 2).mean() for critic in self.critics)
        reward_loss = torch.zeros(())
        if config.reward_loss_weight > 0:
            predicted = self.reward_decoder(critic_in).squeeze(-1)
            reward_loss = ((predicted - config.reward_scale * batch.rewards) ** 2).mean()
        self.critic_optimizer.zero_grad()
        (critic_loss + config.kl_weight * kl + config.reward_loss_weight * reward_loss).backward()
        self.critic_optimizer.step()
        new_action, log_prob = self.agent.act(batch.observations, z_fixed, generator=generator)
        policy_loss = (alpha * log_prob - self._min_q(self.critics, batch.observations, new_action, z_fixed)).mean()
        self.policy_optimizer.zero_grad()
        policy_loss.backward()
        self.policy_optimizer.step()
        if config.learn_temperature:
            alpha_loss = -(self.log_alpha * (log_prob.detach() + config.target_entropy)).mean()
            self.alpha_optimizer.zero_grad()
            alpha_loss.backward()
            self.alpha_optimizer.step()
        with torch.no_grad():
            for target, critic in zip(self.targets, self.critics):
                for target_parameter, parameter in zip(target.parameters(), critic.parameters()):
                    target_parameter.mul_(1 - config.tau).add_(config.tau * parameter)
        return {"critic_loss": float(critic_loss.detach()), "policy_loss": float(policy_loss.detach()),
                "kl": float(kl.detach()), "reward_loss": float(reward_loss.detach()),
                "temperature": float(alpha), "entropy": -float(log_prob.detach().mean())}
