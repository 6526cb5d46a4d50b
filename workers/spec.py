"""The job spec: the one definition of a meta-training job.

Used by the API (request validation, ``/v1/algorithms``), the CLI (``metaserve train``)
and the engine. Unknown fields are errors, every number is bounded, NaN and infinity are
rejected, and every field has a default that works, so

    {"algorithm": {"name": "maml"}, "task_family": {"name": "sine"}}

is a complete job.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, Union

from pydantic import Field, StrictInt, ValidationInfo, field_validator, model_validator

from metaserve.workers.plugins import discover
from metaserve.workers.spec_base import CONTROL_CHARACTERS, StrictModel  # noqa: F401 - re-exported

MAX_ITERATIONS = 10_000_000
MAX_META_BATCH = 4096
MAX_INNER_STEPS = 100
MAX_WORKERS = 1024
MAX_SHOTS = 1000
MAX_WAYS = 100
CONV4_MIN_IMAGE_SIZE = 16


LearningRate = Annotated[float, Field(gt=0.0, le=100.0)]
InnerSteps = Annotated[StrictInt, Field(ge=0, le=MAX_INNER_STEPS)]


# --------------------------------------------------------------------------- algorithms


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
    kl_weight: float = Field(0.1, ge=0.0, le=100.0, description="Weight of KL(q(z|c) ‖ N(0, I)).")
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
    Union[MAMLSpec, ReptileSpec, ANILSpec, MetaSGDSpec, PromptSpec, ProtoNetSpec, FinetuneSpec,
          RL2Spec, PEARLSpec],
    Field(discriminator="name"),
]
ALGORITHMS: dict[str, type[StrictModel]] = {
    "maml": MAMLSpec,
    "reptile": ReptileSpec,
    "anil": ANILSpec,
    "metasgd": MetaSGDSpec,
    "prompt": PromptSpec,
    "protonet": ProtoNetSpec,
    "finetune": FinetuneSpec,
    "rl2": RL2Spec,
    "pearl": PEARLSpec,
}
RL_ALGORITHMS = frozenset({"rl2", "pearl"})  # and maml, on an RL task family


# --------------------------------------------------------------------------- task families

Range = tuple[float, float]


def _check_range(value: Range, field: str) -> Range:
    low, high = value
    if not low <= high:
        raise ValueError(f"{field}: lower bound {low} is above upper bound {high}")
    return value


class _Regression1D(StrictModel):
    @property
    def input_shape(self) -> tuple[int, ...]:
        """One example's input shape."""
        return (1,)

    @property
    def output_dim(self) -> int:
        return 1


class SineSpec(_Regression1D):
    """Sine regression (Finn et al. 2017): y = A·sin(x − φ)."""

    name: Literal["sine"] = "sine"
    support_shots: StrictInt = Field(10, ge=1, le=MAX_SHOTS, description="Support points per task.")
    query_shots: StrictInt = Field(10, ge=1, le=MAX_SHOTS, description="Query points per task.")
    amplitude: Range = Field((0.1, 5.0), description="Amplitude A ~ U[low, high].")
    phase: Range = Field((0.0, math.pi), description="Phase φ ~ U[low, high].")
    x_range: Range = Field((-5.0, 5.0), description="Inputs x ~ U[low, high].")

    @model_validator(mode="after")
    def _ranges(self) -> "SineSpec":
        for field in ("amplitude", "phase", "x_range"):
            _check_range(getattr(self, field), field)
        return self


class LinearSpec(_Regression1D):
    """Linear regression tasks: y = a·x + b + ε, ε ~ N(0, noise_std²)."""

    name: Literal["linear"] = "linear"
    support_shots: StrictInt = Field(10, ge=1, le=MAX_SHOTS, description="Support points per task.")
    query_shots: StrictInt = Field(10, ge=1, le=MAX_SHOTS, description="Query points per task.")
    slope: Range = Field((-3.0, 3.0), description="Slope a ~ U[low, high].")
    intercept: Range = Field((-3.0, 3.0), description="Intercept b ~ U[low, high].")
    noise_std: float = Field(0.0, ge=0.0, le=100.0, description="Observation noise std.")
    x_range: Range = Field((-5.0, 5.0), description="Inputs x ~ U[low, high].")

    @model_validator(mode="after")
    def _ranges(self) -> "LinearSpec":
        for field in ("slope", "intercept", "x_range"):
            _check_range(getattr(self, field), field)
        return self


class _FewShotImages(StrictModel):
    ways: StrictInt = Field(5, ge=2, le=MAX_WAYS, description="Classes per task (N-way).")
    support_shots: StrictInt = Field(1, ge=1, le=MAX_SHOTS, description="Support images per class.")
    query_shots: StrictInt = Field(15, ge=1, le=MAX_SHOTS, description="Query images per class.")
    image_size: StrictInt = Field(28, ge=8, le=224, description="Images are resized to this square.")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One example's input shape (C, H, W)."""
        return (getattr(self, "channels", 1), self.image_size, self.image_size)

    @property
    def output_dim(self) -> int:
        return self.ways


DATASET_ID_PATTERN = r"^ds_[0-9A-Z]{26}$"


class ImagesSpec(_FewShotImages):
    """Few-shot classification from a dataset: an uploaded one (``dataset``: the id that
    ``POST /v1/datasets`` returned) or, for operators, one on the cluster's storage
    (``path``: admin keys only, or under the server's data root).

    ``path`` is a directory in Omniglot's layout (alphabet/character/*.png), in
    ImageFolder's (class/*.png), or an ``.npz`` with ``images`` (uint8 [N,H,W] or
    [N,C,H,W]) and ``labels`` [N]. Classes are split train/val/test with ``split_seed``.
    """

    name: Literal["images"] = "images"
    dataset: str | None = Field(None, pattern=DATASET_ID_PATTERN,
                                description="Id of an uploaded dataset (POST /v1/datasets).")
    path: str | None = Field(None, min_length=1, max_length=4096,
                             description="Dataset directory or .npz file on the cluster's "
                                         "storage (admin keys, or under the data root).")
    layout: Literal["auto", "omniglot", "imagefolder", "npz"] = "auto"
    channels: Literal[1, 3] = Field(1, description="1 = grayscale, 3 = RGB.")
    rotations: bool = Field(False, description="Add 90/180/270° rotations as new classes.")
    split: tuple[float, float, float] = Field((0.7, 0.15, 0.15),
                                              description="Train/val/test class fractions.")
    split_seed: StrictInt = Field(0, ge=0, le=2**31 - 1)

    @model_validator(mode="after")
    def _split(self) -> "ImagesSpec":
        if any(part < 0 for part in self.split) or abs(sum(self.split) - 1.0) > 1e-6:
            raise ValueError("split: fractions must be non-negative and sum to 1")
        if (self.dataset is None) == (self.path is None):
            raise ValueError("name exactly one of dataset (an uploaded dataset's id, from "
                             "POST /v1/datasets) and path (a dataset on the server's storage)")
        if self.dataset is not None and self.layout != "auto":
            raise ValueError("layout applies to a path; an uploaded dataset has one layout")
        return self

    @property
    def source(self) -> str:
        """The dataset, as messages name it."""
        return f"dataset {self.dataset}" if self.dataset else f"dataset path {self.path!r}"


class GlyphsSpec(_FewShotImages):
    """Built-in few-shot family: glyphs rendered from the DejaVu fonts matplotlib ships,
    one class per character, with a random affine distortion per sample. No download."""

    name: Literal["glyphs"] = "glyphs"
    num_characters: StrictInt = Field(1200, ge=20, le=5000, description="Characters (classes) used.")
    distortion: float = Field(1.0, ge=0.0, le=3.0, description="Strength of the affine jitter.")
    split_seed: StrictInt = Field(0, ge=0, le=2**31 - 1)


class TypefacesSpec(_FewShotImages):
    """The hard built-in few-shot family (no download): a class is a character, its images are
    its renderings by the different fonts matplotlib ships (up to 21 "drawers"), with stroke
    and elastic jitter; support and query images come from different fonts; characters are
    split by script and near-duplicates across splits removed. 1 to 5 support shots."""

    name: Literal["typefaces"] = "typefaces"
    distortion: float = Field(1.0, ge=0.0, le=3.0, description="Strength of the elastic and "
                              "affine jitter.")
    stroke_jitter: float = Field(0.5, ge=0.0, le=1.0, description="Probability that an image's "
                                 "strokes are thinned or thickened by a pixel.")
    split_seed: StrictInt = Field(0, ge=0, le=2**31 - 1, description="Shuffles the scripts "
                                  "before they are assigned to train/val/test.")


ColumnName = Annotated[str, Field(min_length=1, max_length=200)]
MAX_LAGS = 100


class TabularSpec(StrictModel):
    """Task-grouped tables: one task per entity (patient, machine, firm), the rows whose
    ``task_column`` holds that entity's id. Entities, never rows, are split train/val/test, so
    evaluation measures adaptation to entities the meta-learner never saw; features and
    regression targets are standardized with statistics of the training entities only.

    With ``time_column`` a task forecasts an entity's future from its past: its support rows
    strictly precede its query rows in time, optionally with the ``lags`` previous targets of
    the same entity as extra features."""

    name: Literal["tabular"] = "tabular"
    dataset: str = Field(..., pattern=DATASET_ID_PATTERN,
                         description="Id of an uploaded table (POST /v1/datasets, CSV or Parquet).")
    task_column: ColumnName = Field(..., description="Column whose value names a row's entity "
                                                     "(one task per entity).")
    target: ColumnName | list[ColumnName] = Field(
        ..., description="Column(s) to predict; a list for several regression targets.")
    features: list[ColumnName] | None = Field(
        None, min_length=1, max_length=10_000,
        description="Input columns, in order (default: every other numeric, non-constant "
                    "column, resolved at submit).")
    problem: Literal["regression", "classification"] = Field(
        "regression", description="regression: MSE on standardized targets; classification: "
                                  "a task's classes are its own labels, remapped to 0..ways-1.")
    ways: StrictInt | None = Field(None, ge=2, le=MAX_WAYS,
                                   description="Classification: classes per task (N-way).")
    support_shots: StrictInt = Field(10, ge=1, le=MAX_SHOTS,
                                     description="Support rows per task (regression) or per "
                                                 "class (classification).")
    query_shots: StrictInt = Field(10, ge=1, le=MAX_SHOTS,
                                   description="Query rows per task (regression) or per class "
                                               "(classification).")
    time_column: ColumnName | None = Field(
        None, description="Orders an entity's rows: a task's support rows precede its query rows.")
    lags: StrictInt = Field(0, ge=0, le=MAX_LAGS,
                            description="Previous targets of the same entity added as features "
                                        "(needs time_column; rows without that many "
                                        "predecessors are not used).")
    split: tuple[float, float, float] = Field((0.7, 0.15, 0.15),
                                              description="Train/val/test fractions of the "
                                                          "entities (tasks), never of rows.")
    split_seed: StrictInt = Field(0, ge=0, le=2**31 - 1)
    on_invalid: Literal["refuse", "skip"] = Field(
        "refuse", description="Entities too small for a task (too few rows, or classes for "
                              "ways): refuse the job (422) or skip them and report the count.")

    @model_validator(mode="after")
    def _consistent(self) -> "TabularSpec":
        if any(part < 0 for part in self.split) or abs(sum(self.split) - 1.0) > 1e-6:
            raise ValueError("split: fractions must be non-negative and sum to 1")
        if self.lags > 0 and self.time_column is None:
            raise ValueError("lags: lagged targets need time_column (the order of an entity's rows)")
        if self.problem == "classification":
            if self.ways is None:
                raise ValueError("ways: classification needs the classes per task (N-way)")
            if len(self.targets) != 1:
                raise ValueError("target: classification predicts one column")
            if self.lags > 0:
                raise ValueError("lags: lagged targets are for regression (forecasting)")
            if self.time_column is not None:
                raise ValueError("time_column: time-ordered tasks forecast a number (problem: "
                                 "regression); classification tasks draw rows by label")
        elif self.ways is not None:
            raise ValueError("ways: only for problem: classification")
        targets = self.targets
        if len(set(targets)) != len(targets):
            raise ValueError(f"target: duplicate column {_first_duplicate(targets)!r}")
        if self.features is not None:
            if len(set(self.features)) != len(self.features):
                raise ValueError(f"features: duplicate column {_first_duplicate(self.features)!r}")
            for column in targets:
                if column in self.features:
                    raise ValueError(f"features: {column!r} is the target")
        for field in ("task_column", "time_column"):
            column = getattr(self, field)
            if column is None:
                continue
            if column in targets:
                raise ValueError(f"{field}: {column!r} is also the target")
            if self.features is not None and column in self.features:
                raise ValueError(f"features: {column!r} is the {field}")
        if self.time_column is not None and self.time_column == self.task_column:
            raise ValueError("time_column: must differ from task_column")
        return self

    @property
    def targets(self) -> list[str]:
        """The target column(s), always as a list."""
        return [self.target] if isinstance(self.target, str) else list(self.target)

    @property
    def input_shape(self) -> tuple[int]:
        """One row's input: the features, then ``lags`` previous values of each target
        (features must be resolved: explicit, or filled in at submit)."""
        if self.features is None:
            raise ValueError("features are resolved against the dataset at submit")
        return (len(self.features) + self.lags * len(self.targets),)

    @property
    def output_dim(self) -> int:
        return self.ways if self.problem == "classification" else len(self.targets)


def _first_duplicate(names: list[str]) -> str:
    """The first name that occurs twice (the caller knows there is one)."""
    return next(name for index, name in enumerate(names) if name in names[:index])


class BanditSpec(StrictModel):
    """k-armed Bernoulli bandits, arm means ~ U[0, 1], ``pulls`` pulls per trial
    (Duan et al. 2016, §4.1)."""

    name: Literal["bandit"] = "bandit"
    arms: StrictInt = Field(5, ge=2, le=1000, description="Arms k.")
    pulls: StrictInt = Field(10, ge=1, le=10_000, description="Pulls n per trial.")


class TabularMDPSpec(StrictModel):
    """Random tabular MDPs (Duan et al. 2016, §4.2): transitions ~ Dirichlet(1), mean rewards
    ~ N(1, 1), rewards ~ N(mean, 1); episodes of ``horizon`` steps, ``episodes`` per trial."""

    name: Literal["tabular_mdp"] = "tabular_mdp"
    states: StrictInt = Field(10, ge=2, le=1000)
    actions: StrictInt = Field(5, ge=2, le=100)
    horizon: StrictInt = Field(10, ge=1, le=10_000, description="Steps per episode.")
    episodes: StrictInt = Field(10, ge=1, le=1000, description="Episodes n per trial.")


class Nav2DSpec(StrictModel):
    """2-D navigation (Finn et al. 2017, §5.3): a point robot starts at the origin and must
    reach a goal ~ U[−0.5, 0.5]²; reward = −distance to the goal, actions clipped to
    ±``max_action`` per axis, ``horizon`` steps (the episode ends at the goal)."""

    name: Literal["nav2d"] = "nav2d"
    goal_range: Range = Field((-0.5, 0.5), description="Goal coordinates ~ U[low, high].")
    horizon: StrictInt = Field(100, ge=1, le=10_000, description="Steps per episode.")
    max_action: float = Field(0.1, gt=0.0, le=10.0, description="Action bound per axis.")
    episodes: StrictInt = Field(2, ge=1, le=1000, description="Episodes per trial (RL² only).")

    @model_validator(mode="after")
    def _ranges(self) -> "Nav2DSpec":
        _check_range(self.goal_range, "goal_range")
        return self


class HalfCheetahVelSpec(StrictModel):
    """Half-cheetah running at a goal velocity (Finn et al. 2017, §5.3): MuJoCo's HalfCheetah
    (gymnasium's v5 model, 17-D observation, 6 torques in [−1, 1]); goal velocity ~
    U[``velocity_range``]; reward = −|forward velocity − goal| − 0.05 ‖a‖²; ``horizon`` steps."""

    name: Literal["halfcheetah_vel"] = "halfcheetah_vel"
    velocity_range: Range = Field((0.0, 2.0), description="Goal velocity ~ U[low, high].")
    horizon: StrictInt = Field(200, ge=1, le=10_000, description="Steps per episode.")
    episodes: StrictInt = Field(2, ge=1, le=1000, description="Episodes per trial (RL² only).")

    @model_validator(mode="after")
    def _ranges(self) -> "HalfCheetahVelSpec":
        _check_range(self.velocity_range, "velocity_range")
        return self


TASK_FAMILIES: dict[str, type[StrictModel]] = {
    "sine": SineSpec,
    "linear": LinearSpec,
    "images": ImagesSpec,
    "glyphs": GlyphsSpec,
    "typefaces": TypefacesSpec,
    "bandit": BanditSpec,
    "tabular_mdp": TabularMDPSpec,
    "nav2d": Nav2DSpec,
    "halfcheetah_vel": HalfCheetahVelSpec,
    "tabular": TabularSpec,
}
IMAGE_FAMILIES = frozenset({"images", "glyphs", "typefaces"})
RL_FAMILIES = frozenset({"bandit", "tabular_mdp", "nav2d", "halfcheetah_vel"})
# Which RL algorithms run on which RL families (MAML-RL: continuous actions; PEARL: nav2d).
RL_ALGORITHM_FAMILIES: dict[str, frozenset[str]] = {
    "rl2": frozenset({"bandit", "tabular_mdp", "nav2d", "halfcheetah_vel"}),
    "pearl": frozenset({"nav2d"}),
    "maml": frozenset({"nav2d", "halfcheetah_vel"}),
}


# --------------------------------------------------------------------------- models


class MLPSpec(StrictModel):
    """Fully connected network; the output size comes from the task family."""

    name: Literal["mlp"] = "mlp"
    hidden: list[Annotated[StrictInt, Field(ge=1, le=8192)]] = Field(
        default_factory=lambda: [40, 40], max_length=16, description="Hidden layer sizes.")
    activation: Literal["relu", "tanh", "gelu"] = "relu"


Norm = Literal["batch", "support", "instance", "layer", "none"]
NORM_DESCRIPTION = (
    "batch: statistics of the batch (transductive, as in MAML's paper; the served predictor "
    "uses the support set's); support: the task's support set's, in training too; instance: "
    "each image's own per channel; layer: each image's over (C, H, W); none.")


class Conv4Spec(StrictModel):
    """The standard few-shot backbone: 4 × [conv3×3 → norm → ReLU → max-pool 2]."""

    name: Literal["conv4"] = "conv4"
    filters: StrictInt = Field(64, ge=1, le=1024, description="Channels of every conv layer.")
    norm: Norm = Field("batch", description=NORM_DESCRIPTION)


class ResNet12Spec(StrictModel):
    """ResNet-12 (Lee et al. 2019; Oreshkin et al. 2018): 4 residual blocks of 3 × [conv3×3 →
    norm → leaky ReLU] with a 1×1 shortcut, max-pool 2 after each, global average pooling."""

    name: Literal["resnet12"] = "resnet12"
    widths: tuple[Annotated[StrictInt, Field(ge=1, le=2048)], ...] = Field(
        (64, 160, 320, 640), min_length=4, max_length=4,
        description="Channels of the four blocks (the papers': 64-160-320-640; smaller for a CPU).")
    norm: Norm = Field("batch", description=NORM_DESCRIPTION)


MODELS: dict[str, type[StrictModel]] = {"mlp": MLPSpec, "conv4": Conv4Spec,
                                        "resnet12": ResNet12Spec}


# --------------------------------------------------------------------------- plugins and unions

# Installed plugins join the registries here, once per process, before the unions are built,
# so a plugin's spec is validated like a built-in's (metaserve.workers.plugins).
BUILTIN_TASK_FAMILIES = frozenset(TASK_FAMILIES)
BUILTIN_MODELS = frozenset(MODELS)
PLUGINS = discover(builtin_models=BUILTIN_MODELS, builtin_task_families=BUILTIN_TASK_FAMILIES)
TASK_FAMILIES.update({name: plugin.spec for name, plugin in PLUGINS.task_families.items()})
MODELS.update({name: plugin.spec for name, plugin in PLUGINS.models.items()})
TaskFamilySpec = Annotated[Union[tuple(TASK_FAMILIES.values())], Field(discriminator="name")]
ModelSpec = Annotated[Union[tuple(MODELS.values())], Field(discriminator="name")]


# --------------------------------------------------------------------------- the rest


class OuterOptimizerSpec(StrictModel):
    name: Literal["adam", "sgd"] = "adam"
    lr: LearningRate = Field(0.001, description="Outer (meta) learning rate.")


class EvaluationSpec(StrictModel):
    every: StrictInt = Field(500, ge=0, le=MAX_ITERATIONS,
                       description="Evaluate on validation tasks every N iterations (0: only at the end).")
    tasks: StrictInt = Field(600, ge=1, le=100_000, description="Held-out tasks per evaluation.")
    inner_steps: list[InnerSteps] = Field(default_factory=lambda: [1, 10], min_length=1,
                                          max_length=16,
                                          description="Adaptation step counts to report.")
    support_shots: StrictInt | None = Field(None, ge=1, le=MAX_SHOTS,
                                      description="Support shots at evaluation (default: training's).")


class ResourcesSpec(StrictModel):
    workers: StrictInt = Field(1, ge=1, le=MAX_WORKERS, description="Inner-loop workers (Ray actors).")
    cpus_per_worker: float = Field(1.0, gt=0.0, le=256.0)
    gpus_per_worker: float = Field(0.0, ge=0.0, le=16.0)
    task_chunk: StrictInt | None = Field(None, ge=1, le=MAX_META_BATCH,
                                   description="Tasks vectorized at once per worker (bounds memory).")
    fast_path: bool = Field(True, description="Meta-step of MLP models batched by hand over the tasks "
                                              "(same maths as the vmapped step, within float rounding); "
                                              "false: always the vmapped step.")

    @property
    def torch_threads(self) -> int:
        """torch threads of a process that runs all of the job's workers' share itself (a sweep
        trial, ``metaserve train``): the CPUs its workers would hold, at least one."""
        return max(1, int(self.workers * self.cpus_per_worker))


class JobSpec(StrictModel):
    """A meta-training job."""

    name: str | None = Field(None, max_length=200)
    algorithm: AlgorithmSpec
    task_family: TaskFamilySpec
    model: ModelSpec | None = Field(
        None, description="Network; default: conv4 for image families, mlp [40, 40] otherwise.")
    meta_batch_size: StrictInt = Field(25, ge=1, le=MAX_META_BATCH)
    iterations: StrictInt = Field(1000, ge=1, le=MAX_ITERATIONS)
    outer_optimizer: OuterOptimizerSpec = Field(default_factory=OuterOptimizerSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    checkpoint_every: StrictInt = Field(500, ge=1, le=MAX_ITERATIONS)
    log_every: StrictInt = Field(10, ge=1, le=MAX_ITERATIONS)
    seed: StrictInt = Field(0, ge=0, le=2**31 - 1)
    max_attempts: StrictInt = Field(3, ge=1, le=20)
    max_runtime_s: StrictInt | None = Field(
        None, ge=1, le=10 * 365 * 86400,
        description="Seconds an attempt may run before the job fails with that reason "
                    "(default and cap: the server's METASERVE_MAX_RUNTIME_S).")

    @field_validator("task_family", "model", mode="before")
    @classmethod
    def _not_a_broken_plugin(cls, value: object, info: ValidationInfo) -> object:
        """A name only a broken plugin declares is refused saying so (not "unknown name")."""
        name = value.get("name") if isinstance(value, dict) else None
        known = TASK_FAMILIES if info.field_name == "task_family" else MODELS
        broken = None if name in known else PLUGINS.broken_for(info.field_name, name)
        if broken is not None:
            raise ValueError(f"{name!r} comes from the plugin package {broken.package}, which is "
                             f"installed but could not be loaded here: {broken.reason}")
        return value

    @field_validator("task_family")
    @classmethod
    def _algorithm_fits_family(cls, family, info: ValidationInfo):  # noqa: ANN001, ANN206
        """Meta-RL algorithms need an RL family and supervised ones a supervised family; the
        error is reported on ``task_family`` and names both."""
        algorithm = info.data.get("algorithm")
        if algorithm is None:  # the algorithm itself was invalid: reported there
            return family
        is_rl_family = family.name in RL_FAMILIES
        if algorithm.name in RL_ALGORITHMS and not is_rl_family:
            raise ValueError(
                f"algorithm {algorithm.name!r} needs an RL task family "
                f"({', '.join(sorted(RL_ALGORITHM_FAMILIES[algorithm.name]))}), got {family.name!r}")
        if is_rl_family:
            allowed = RL_ALGORITHM_FAMILIES.get(algorithm.name, frozenset())
            if family.name not in allowed:
                runs_on = [name for name, families in RL_ALGORITHM_FAMILIES.items()
                           if family.name in families]
                raise ValueError(
                    f"task family {family.name!r} runs with algorithm "
                    f"{' or '.join(repr(n) for n in runs_on)}, not {algorithm.name!r}")
        elif algorithm.name == "protonet" and family.name not in IMAGE_FAMILIES:
            raise ValueError(f"algorithm 'protonet' classifies images: it needs an image family "
                             f"({', '.join(sorted(IMAGE_FAMILIES))}), got {family.name!r}")
        elif algorithm.name == "maml" and algorithm.policy_gradient is not None:
            raise ValueError(f"algorithm.policy_gradient is only for RL task families "
                             f"({', '.join(sorted(RL_FAMILIES))}), got {family.name!r}")
        return family

    @field_validator("model")
    @classmethod
    def _no_model_for_rl(cls, model, info: ValidationInfo):  # noqa: ANN001, ANN206
        family = info.data.get("task_family")
        if model is not None and family is not None and family.name in RL_FAMILIES:
            raise ValueError("RL jobs take their policy architecture from the algorithm's "
                             "parameters; leave model out")
        return model

    @field_validator("model", mode="after")
    @classmethod
    def _conv4_fits_the_images(cls, model: "ModelSpec | None", info: ValidationInfo) -> "ModelSpec | None":
        """Conv4 and ResNet-12 halve the image four times: below 16 pixels nothing is left for
        their heads."""
        family = info.data.get("task_family")
        size = getattr(family, "image_size", None)
        conv4 = isinstance(model, (Conv4Spec, ResNet12Spec)) or (
            model is None and family is not None and family.name in IMAGE_FAMILIES)
        if conv4 and size is not None and size < CONV4_MIN_IMAGE_SIZE:
            raise ValueError(f"{model.name if model else 'conv4'} needs task_family.image_size >= "
                             f"{CONV4_MIN_IMAGE_SIZE} "
                             f"(four 2x poolings), got {size}")
        return model

    @model_validator(mode="after")
    def _protonet_evaluates_without_steps(self) -> "JobSpec":
        """ProtoNets take no inner steps: unless asked otherwise, evaluate at step 0 only."""
        if self.algorithm.name == "protonet" and "inner_steps" not in self.evaluation.model_fields_set:
            self.evaluation.inner_steps = [0]
        return self

    @model_validator(mode="after")
    def _default_model(self) -> "JobSpec":
        if self.model is None and not self.is_rl:
            if self.task_family.name in IMAGE_FAMILIES:
                self.model = Conv4Spec()
            else:
                self.model = MLPSpec()
        return self

    @property
    def is_classification(self) -> bool:
        return (self.task_family.name in IMAGE_FAMILIES
                or getattr(self.task_family, "problem", None) == "classification")

    @property
    def is_rl(self) -> bool:
        """True for a meta-RL job (run by :func:`metaserve.workers.rl.run_rl_job`)."""
        return self.task_family.name in RL_FAMILIES
