"""Running an RL² policy (Duan et al. 2016) on trials, in plain torch: used by the RL² trainer's
evaluation and by :func:`metaserve.workers.rl.load_meta_policy` (no RLlib needed to run a policy)."""

from __future__ import annotations

import numpy as np
import torch

from metaserve.workers.rl.policies import RecurrentPolicy
from metaserve.workers.rl.tasks import RLTaskFamily, Task
from metaserve.workers.rl.trials import TrialEnv


def rl2_network(family: RLTaskFamily, hidden_size: int) -> RecurrentPolicy:
    """The RL² network for ``family``'s trial observations and actions."""
    env = TrialEnv(family, seed=0)
    action_space = env.action_space
    action_size = action_space.n if family.discrete else action_space.shape[0]
    return RecurrentPolicy(env.observation_space.shape[0], action_size, hidden_size, family.discrete)


def rl2_meta_policy(network: RecurrentPolicy, family: RLTaskFamily) -> tuple[dict[str, torch.Tensor], dict]:
    """The meta-policy artifact's content: the network's tensors, architecture and recipe."""
    tensors = {name: value.detach().cpu().clone() for name, value in network.state_dict().items()}
    architecture = {"kind": "rl2_lstm", "hidden_size": network.hidden_size, "discrete": network.discrete}
    recipe = {"algorithm": "rl2", "adaptation": "recurrent state over one trial",
              "trial_episodes": family.trial_episodes}
    return tensors, {"architecture": architecture, "recipe": recipe}


@torch.no_grad()
def run_rl2_trials(network: RecurrentPolicy, family: RLTaskFamily, tasks: list[Task], *,
                   seed: int, split: str = "test", greedy: bool = False) -> np.ndarray:
    """Total reward of one trial per task (hidden state kept across the trial's episodes);
    actions are sampled from the policy (``greedy``: its most likely action, or the Gaussian
    mean). Returns an array [len(tasks)]."""
    envs = [TrialEnv(family, seed=seed, split=split, stream=index) for index in range(len(tasks))]
    observations = []
    for env, task in zip(envs, tasks):
        env.set_task(task)
        observations.append(env.reset()[0])
    generator = torch.Generator().manual_seed(seed)
    state = network.initial_state(len(tasks))
    totals = np.zeros(len(tasks))
    running = np.ones(len(tasks), dtype=bool)
    while running.any():
        batch = torch.from_numpy(np.stack(observations)).float()[:, None, :]
        outputs, _, state = network(batch, state)
        outputs = outputs[:, 0]
        if family.discrete and greedy:
            actions = outputs.argmax(-1).numpy()
        elif family.discrete:
            actions = torch.multinomial(torch.softmax(outputs, -1), 1, generator=generator)[:, 0].numpy()
        else:
            mean, log_std = outputs.chunk(2, dim=-1)
            noise = 0.0 if greedy else log_std.exp() * torch.randn(mean.shape, generator=generator)
            actions = (mean + noise).numpy()
        for index, env in enumerate(envs):
            if not running[index]:
                continue
            observation, reward, terminated, truncated, _ = env.step(actions[index])
            observations[index] = observation
            totals[index] += reward
            running[index] = not (terminated or truncated)
    return totals
