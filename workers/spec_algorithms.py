"""The algorithms a job may name (``algorithm: {name: ...}``), each with its own typed
parameters: the discriminated union :data:`AlgorithmSpec` and the registry :data:`ALGORITHMS`.
Part of the job spec (:mod:`metaserve.workers.spec`, which re-exports every name here)."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, StrictInt

from metaserve.workers.spec_base import (MAX_INNER_STEPS, MAX_META_BATCH, MAX_WORKERS, InnerSteps, LearningRate,
                                         StrictModel)


class PolicyGradientSpec(StrictModel):
    """MAML on an RL task family (Finn et al. 2017, §5.3): the inner loop is vanilla policy
    gradient (VPG) on trajectories of the task; the outer update, on the adapted policy's
    trajectories and differentiated through the inner steps, is either the paper's TRPO step
    (``outer: trpo``: natural gradient by conjugate gradient on Hessian-vector products of the
    mean KL between the old and new adapted policies, then a backtracking line search under
    ``max_kl``) or ``outer_epochs`` Adam steps on PPO's clipped surrogate (``outer: ppo``,
    Schulman et al. 2017; ``outer_optimizer`` applies to PPO only)."""

    episodes_per_task: StrictInt = Field(20, ge=1, le=1000,
                                   description="Trajectories per task per policy-gradient step.")
    gamma: float = Field(0.99, gt=0.0, le=1.0, description="Discount factor.")
    gae_lambda: float = Field(1.0, ge=0.0, le=1.0, description="GAE λ of the advantages.")
    outer_epochs: StrictInt = Field(5, ge=1, le=100, description="Outer PPO steps on each meta-batch.")
    clip: float = Field(0.2, gt=0.0, le=1.0, description="PPO ratio clip ε.")
    hidden: list[Annotated[StrictInt, Field(ge=1, le=4096)]] = Field(
        default_factory=lambda: [100, 100], min_length=1, max_length=8,
        description="Hidden layer sizes of the Gaussian MLP policy.")
    init_log_std: float = Field(0.0, ge=-10.0, le=5.0, description="Initial log std of actions.")
    normalize_actions: bool = Field(
        False, description="The policy acts in [-1, 1] units, scaled to the family's max action "
                           "(rllab's normalize(), as in the paper's code); off: raw env units.")
    later_inner_lr: float | None = Field(
        None, gt=0.0, le=100.0, description="Inner lr of the 2nd and later PG steps, in training "
                                            "and evaluation (None: inner_lr; the paper's test: α/2).")
    outer: Literal["trpo", "ppo"] = Field("ppo", description="The outer (meta) update.")
    max_kl: float = Field(0.01, gt=0.0, le=10.0,
                          description="TRPO: bound on the mean KL of the adapted policies.")
    cg_iters: StrictInt = Field(10, ge=1, le=100, description="TRPO: conjugate-gradient iterations.")
    cg_damping: float = Field(1e-5, ge=0.0, le=10.0,
                              description="TRPO: damping λ added to the KL Hessian (H + λI).")
    line_search_steps: StrictInt = Field(15, ge=1, le=50,
                                   description="TRPO: backtracking steps before giving up.")
    backtrack_ratio: float = Field(0.8, gt=0.0, lt=1.0,
                                   description="TRPO: step shrink factor per backtracking step.")


class MAMLSpec(StrictModel):
    """Model-Agnostic Meta-Learning (Finn et al. 2017); ``first_order`` gives FOMAML.

    On an RL task family (nav2d, halfcheetah_vel) the inner loop is policy gradient,
    configured by ``policy_gradient`` (defaults apply when it is left out)."""

    name: Literal["maml"] = "maml"
    inner_lr: LearningRate = Field(0.01, description="Inner-loop SGD step size α.")
    inner_steps: InnerSteps = Field(1, description="Inner-loop SGD steps during meta-training.")
    first_order: bool = Field(False, description="Drop second-order terms (FOMAML).")
    policy_gradient: PolicyGradientSpec | None = Field(
        None, description="RL task families only: the policy-gradient inner loop and outer update.")


class ReptileSpec(StrictModel):
    """Reptile (Nichol et al. 2018): θ ← θ + ε · mean(θ_task − θ).

    The outer optimizer is applied to the pseudo-gradient −mean(θ_task − θ); with
    ``outer_optimizer: {name: sgd, lr: ε}`` this is exactly the paper's update.
    """

    name: Literal["reptile"] = "reptile"
    inner_lr: LearningRate = Field(0.01, description="Inner-loop SGD step size.")
    inner_steps: InnerSteps = Field(5, description="Inner-loop SGD steps per task.")


class ANILSpec(StrictModel):
    """Almost No Inner Loop (Raghu et al. 2020): only the head adapts per task."""

    name: Literal["anil"] = "anil"
    inner_lr: LearningRate = Field(0.01, description="Inner-loop SGD step size for the head.")
    inner_steps: InnerSteps = Field(1, description="Inner-loop SGD steps during meta-training.")
    first_order: bool = Field(False, description="Drop second-order terms.")


class MetaSGDSpec(StrictModel):
    """Meta-SGD (Li et al. 2017): per-parameter inner learning rates learned with θ."""

    name: Literal["metasgd"] = "metasgd"
    inner_lr: LearningRate = Field(0.01, description="Initial value of every learned inner lr.")
    inner_steps: InnerSteps = Field(1, description="Inner-loop steps during meta-training.")
    first_order: bool = Field(False, description="Drop second-order terms.")


class MAMLPlusPlusSpec(StrictModel):
    """MAML++ (Antoniou et al. 2019): learned per-layer, per-step inner learning rates (LSLR),
    the multi-step loss annealed toward the last step, and optionally first-order inner
    gradients for the first iterations (derivative-order annealing)."""

    name: Literal["mamlpp"] = "mamlpp"
    inner_lr: LearningRate = Field(0.01, description="Initial value of every learned per-layer, "
                                                     "per-step inner lr.")
    inner_steps: Annotated[StrictInt, Field(ge=1, le=MAX_INNER_STEPS)] = Field(
        5, description="Inner-loop steps during meta-training (one learned lr per layer per step).")
    first_order: bool = Field(False, description="Drop second-order terms throughout.")
    multi_step_loss_iterations: StrictInt = Field(
        1000, ge=0, le=10**7, description="Meta-iterations over which the multi-step loss (query losses "
        "after every inner step, weights annealed toward the last) is used; 0: the last step's loss only.")
    first_order_iterations: StrictInt = Field(
        0, ge=0, le=10**7, description="Derivative-order annealing: first-order inner gradients for "
        "this many meta-iterations, then second order.")


class MetaCurvatureSpec(StrictModel):
    """Meta-Curvature (Park & Oliva 2019): the inner gradient of each parameter transformed by a
    learned Kronecker-factored matrix (M_out · G · M_in, and M_f over a kernel), from identity."""

    name: Literal["metacurvature"] = "metacurvature"
    inner_lr: LearningRate = Field(0.01, description="Inner-loop step size α (applied after the "
                                                     "transform).")
    inner_steps: InnerSteps = Field(1, description="Inner-loop steps during meta-training.")
    first_order: bool = Field(False, description="Drop second-order terms.")


class PromptSpec(StrictModel):
    """Prompt (context) tuning, CAVIA-style (Zintgraf et al. 2019).

    A prompt vector, reset to zero for every task, is concatenated to the network's input;
    only the prompt adapts in the inner loop, the backbone is meta-learned.
    """

    name: Literal["prompt"] = "prompt"
    inner_lr: LearningRate = Field(1.0, description="Inner-loop step size for the prompt.")
    inner_steps: InnerSteps = Field(1, description="Inner-loop steps during meta-training.")
    first_order: bool = Field(False, description="Drop second-order terms.")
    prompt_dim: StrictInt = Field(4, ge=1, le=1024, description="Size of the per-task prompt vector.")


class ProtoNetSpec(StrictModel):
    """Prototypical Networks (Snell et al. 2017): the network embeds images; a task's class
    prototypes are the mean embeddings of its support images, and a query image goes to the
    nearest prototype (squared Euclidean). No inner steps; image families only."""

    name: Literal["protonet"] = "protonet"

    @property
    def inner_steps(self) -> int:
        """Adapting is averaging, not gradient steps."""
        return 0

    @property
    def inner_lr(self) -> float:
        return 0.0


class FinetuneSpec(StrictModel):
    """The pooled baseline (Finn et al. 2017 §5.1's "pretrained"; Chen et al. 2019's Baseline):
    one model trained on the rows of all training tasks together, no inner loop; adapting to
    a task is ``inner_steps`` SGD steps at ``inner_lr`` from it on the task's support set, as
    MAML's evaluation does. The yardstick a meta-learner must beat on the same budget."""

    name: Literal["finetune"] = "finetune"
    inner_lr: LearningRate = Field(0.01, description="SGD step size of the per-task fine-tuning.")
    inner_steps: InnerSteps = Field(10, description="Fine-tuning steps on a task's support set "
                                                    "when adapting (not used in training).")


class RL2Spec(StrictModel):
    """RL² (Duan et al. 2016): a recurrent policy, fed the previous action, reward and
    episode-done flag, trained with PPO (Schulman et al. 2017) on RLlib's new API stack. A trial
    is ``episodes_per_trial`` episodes of one task; the hidden state is kept across them, so
    the network itself learns to explore and exploit. ``meta_batch_size`` trials per iteration.

    The defaults are the settings that reached the RL² paper on bandits with n = 10 pulls
    (docs/notes/rl2-bandits.md: many small PPO minibatches), except the annealing, which those runs
    added with ``lr_final: 0.0002`` and ``entropy_coeff_final: 0`` (examples/rl2_bandit.yaml).
    """

    name: Literal["rl2"] = "rl2"
    hidden_size: StrictInt = Field(64, ge=4, le=1024, description="LSTM cell size.")
    lr: LearningRate = Field(0.001, description="PPO learning rate (Adam).")
    gamma: float = Field(0.9, gt=0.0, le=1.0, description="Discount factor within a trial.")
    gae_lambda: float = Field(0.9, ge=0.0, le=1.0, description="GAE λ.")
    clip: float = Field(0.2, gt=0.0, le=1.0, description="PPO ratio clip ε.")
    entropy_coeff: float = Field(0.02, ge=0.0, le=1.0, description="Entropy bonus weight.")
    lr_final: float | None = Field(None, gt=0.0, le=100.0,
                                   description="Learning rate reached linearly at the end of "
                                               "anneal_env_steps (None: constant lr).")
    entropy_coeff_final: float | None = Field(None, ge=0.0, le=1.0,
                                              description="Entropy weight reached linearly at the "
                                                          "end of anneal_env_steps (None: constant).")
    anneal_env_steps: StrictInt | None = Field(None, ge=1, le=10**12,
                                         description="Env steps of the lr / entropy schedules "
                                                     "(None: iterations × trials × trial length).")
    grad_clip: float | None = Field(10.0, gt=0.0, le=1e6, description="Global gradient-norm clip.")
    vf_loss_coeff: float = Field(0.5, ge=0.0, le=100.0, description="Value loss weight.")
    num_epochs: StrictInt = Field(4, ge=1, le=100, description="PPO epochs per iteration.")
    minibatch_trials: StrictInt = Field(16, ge=1, le=MAX_META_BATCH,
                                  description="Trials per PPO minibatch.")
    env_runners: StrictInt = Field(0, ge=0, le=MAX_WORKERS,
                             description="RLlib env-runner actors (0: sample in the learner).")
    envs_per_runner: StrictInt = Field(64, ge=1, le=1024, description="Vectorized envs per runner.")
    evaluation_trials: StrictInt = Field(1000, ge=1, le=100_000,
                                   description="Held-out trials for the final evaluation.")


class PEARLSpec(StrictModel):
    """PEARL (Rakelly et al. 2019): off-policy SAC (Haarnoja et al. 2018) conditioned on a latent
    task variable z inferred by a probabilistic context encoder (product of Gaussians over
    transitions, KL to N(0, I)); posterior sampling drives exploration. Rollouts are
    collected by ``rollout_workers`` Ray actors. ``meta_batch_size`` tasks per gradient step."""

    name: Literal["pearl"] = "pearl"
    latent_dim: StrictInt = Field(5, ge=1, le=256, description="Size of the task variable z.")
    hidden: StrictInt = Field(128, ge=8, le=2048, description="Width of every hidden layer.")
    lr: LearningRate = Field(0.0003, description="Adam step size of every network.")
    kl_weight: float = Field(
        0.1, ge=0.0, le=100.0, description="Weight of KL(q(z|c) ‖ N(0, I)) per task: the loss adds "
        "kl_weight × the mean over the meta-batch's tasks, so it does not change with meta_batch_size "
        "(the reference implementation sums over tasks: its λ is kl_weight / meta_batch_size). 0.1 is "
        "the setting measured on nav2d; 1.6 (rlkit's 0.1 summed over 16 tasks) collapses the posterior there.")
    gamma: float = Field(0.99, gt=0.0, le=1.0, description="Discount factor.")
    tau: float = Field(0.005, gt=0.0, le=1.0, description="Target network soft-update rate.")
    reward_scale: float = Field(5.0, gt=0.0, le=1000.0, description="SAC reward scale.")
    learn_temperature: bool = Field(True, description="Tune the entropy temperature α to reach "
                                    "target_entropy (Haarnoja et al. 2018b); false: α fixed.")
    temperature: float = Field(1.0, gt=0.0, le=100.0,
                               description="Entropy temperature α (its initial value if learned).")
    target_entropy: float = Field(-2.0, ge=-100.0, le=100.0,
                                  description="Entropy target (nats, actions scaled to [-1, 1]).")
    reward_loss_weight: float = Field(
        0.0, ge=0.0, le=100.0, description="Weight of an auxiliary loss training the encoder (with "
        "a decoder r(s, a, z)) to predict the scaled reward, besides the critic's (0: the paper's).")
    train_tasks: StrictInt = Field(100, ge=1, le=10_000, description="Fixed pool of training tasks.")
    context_size: StrictInt = Field(64, ge=1, le=10_000, description="Transitions in a context batch.")
    batch_size: StrictInt = Field(256, ge=1, le=10_000, description="RL transitions per task per step.")
    tasks_per_iteration: StrictInt = Field(5, ge=1, le=1000,
                                     description="Tasks whose rollouts are collected per iteration.")
    gradient_steps: StrictInt = Field(50, ge=1, le=10_000, description="Gradient steps per iteration.")
    rollout_workers: StrictInt = Field(1, ge=1, le=MAX_WORKERS, description="Ray rollout actors.")
    evaluation_tasks: StrictInt = Field(100, ge=1, le=100_000, description="Held-out tasks at the end.")
    adaptation_episodes: StrictInt = Field(2, ge=1, le=100,
                                     description="Episodes of context gathered on a new task.")


AlgorithmSpec = Annotated[
    Union[MAMLSpec, ReptileSpec, ANILSpec, MetaSGDSpec, MAMLPlusPlusSpec, MetaCurvatureSpec,
          PromptSpec, ProtoNetSpec, FinetuneSpec, RL2Spec, PEARLSpec],
    Field(discriminator="name"),
]
ALGORITHMS: dict[str, type[StrictModel]] = {
    "maml": MAMLSpec,
    "reptile": ReptileSpec,
    "anil": ANILSpec,
    "metasgd": MetaSGDSpec,
    "mamlpp": MAMLPlusPlusSpec,
    "metacurvature": MetaCurvatureSpec,
    "prompt": PromptSpec,
    "protonet": ProtoNetSpec,
    "finetune": FinetuneSpec,
    "rl2": RL2Spec,
    "pearl": PEARLSpec,
}
RL_ALGORITHMS = frozenset({"rl2", "pearl"})  # and maml, on an RL task family
