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

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_ITERATIONS = 10_000_000
MAX_META_BATCH = 4096
MAX_INNER_STEPS = 100
MAX_WORKERS = 1024
MAX_SHOTS = 1000
MAX_WAYS = 100


class StrictModel(BaseModel):
    """Base of every spec model: unknown fields and non-finite floats are rejected."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_default=True)


LearningRate = Annotated[float, Field(gt=0.0, le=100.0)]
InnerSteps = Annotated[int, Field(ge=0, le=MAX_INNER_STEPS)]


# --------------------------------------------------------------------------- algorithms


class MAMLSpec(StrictModel):
    """Model-Agnostic Meta-Learning (Finn et al. 2017); ``first_order`` gives FOMAML."""

    name: Literal["maml"] = "maml"
    inner_lr: LearningRate = Field(0.01, description="Inner-loop SGD step size α.")
    inner_steps: InnerSteps = Field(1, description="Inner-loop SGD steps during meta-training.")
    first_order: bool = Field(False, description="Drop second-order terms (FOMAML).")


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
    prompt_dim: int = Field(4, ge=1, le=1024, description="Size of the per-task prompt vector.")


AlgorithmSpec = Annotated[
    Union[MAMLSpec, ReptileSpec, ANILSpec, MetaSGDSpec, PromptSpec],
    Field(discriminator="name"),
]
ALGORITHMS: dict[str, type[StrictModel]] = {
    "maml": MAMLSpec,
    "reptile": ReptileSpec,
    "anil": ANILSpec,
    "metasgd": MetaSGDSpec,
    "prompt": PromptSpec,
}


# --------------------------------------------------------------------------- task families

Range = tuple[float, float]


def _check_range(value: Range, field: str) -> Range:
    low, high = value
    if not low <= high:
        raise ValueError(f"{field}: lower bound {low} is above upper bound {high}")
    return value


class SineSpec(StrictModel):
    """Sine regression (Finn et al. 2017): y = A·sin(x − φ)."""

    name: Literal["sine"] = "sine"
    support_shots: int = Field(10, ge=1, le=MAX_SHOTS, description="Support points per task.")
    query_shots: int = Field(10, ge=1, le=MAX_SHOTS, description="Query points per task.")
    amplitude: Range = Field((0.1, 5.0), description="Amplitude A ~ U[low, high].")
    phase: Range = Field((0.0, math.pi), description="Phase φ ~ U[low, high].")
    x_range: Range = Field((-5.0, 5.0), description="Inputs x ~ U[low, high].")

    @model_validator(mode="after")
    def _ranges(self) -> "SineSpec":
        for field in ("amplitude", "phase", "x_range"):
            _check_range(getattr(self, field), field)
        return self


class LinearSpec(StrictModel):
    """Linear regression tasks: y = a·x + b + ε, ε ~ N(0, noise_std²)."""

    name: Literal["linear"] = "linear"
    support_shots: int = Field(10, ge=1, le=MAX_SHOTS, description="Support points per task.")
    query_shots: int = Field(10, ge=1, le=MAX_SHOTS, description="Query points per task.")
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
    ways: int = Field(5, ge=2, le=MAX_WAYS, description="Classes per task (N-way).")
    support_shots: int = Field(1, ge=1, le=MAX_SHOTS, description="Support images per class.")
    query_shots: int = Field(15, ge=1, le=MAX_SHOTS, description="Query images per class.")
    image_size: int = Field(28, ge=8, le=224, description="Images are resized to this square.")


class ImagesSpec(_FewShotImages):
    """Few-shot classification from a dataset on the cluster's storage.

    ``path`` is a directory in Omniglot's layout (alphabet/character/*.png), in
    ImageFolder's (class/*.png), or an ``.npz`` with ``images`` (uint8 [N,H,W] or
    [N,C,H,W]) and ``labels`` [N]. Classes are split train/val/test with ``split_seed``.
    """

    name: Literal["images"] = "images"
    path: str = Field("datasets/omniglot", min_length=1, max_length=4096,
                      description="Dataset directory or .npz file.")
    layout: Literal["auto", "omniglot", "imagefolder", "npz"] = "auto"
    channels: Literal[1, 3] = Field(1, description="1 = grayscale, 3 = RGB.")
    rotations: bool = Field(False, description="Add 90/180/270° rotations as new classes.")
    split: tuple[float, float, float] = Field((0.7, 0.15, 0.15),
                                              description="Train/val/test class fractions.")
    split_seed: int = Field(0, ge=0, le=2**31 - 1)

    @model_validator(mode="after")
    def _split(self) -> "ImagesSpec":
        if any(part < 0 for part in self.split) or abs(sum(self.split) - 1.0) > 1e-6:
            raise ValueError("split: fractions must be non-negative and sum to 1")
        return self


class GlyphsSpec(_FewShotImages):
    """Built-in few-shot family: glyphs rendered from the DejaVu fonts matplotlib ships,
    one class per character, with a random affine distortion per sample. No download."""

    name: Literal["glyphs"] = "glyphs"
    num_characters: int = Field(1200, ge=20, le=5000, description="Characters (classes) used.")
    distortion: float = Field(1.0, ge=0.0, le=3.0, description="Strength of the affine jitter.")
    split_seed: int = Field(0, ge=0, le=2**31 - 1)


TaskFamilySpec = Annotated[
    Union[SineSpec, LinearSpec, ImagesSpec, GlyphsSpec],
    Field(discriminator="name"),
]
TASK_FAMILIES: dict[str, type[StrictModel]] = {
    "sine": SineSpec,
    "linear": LinearSpec,
    "images": ImagesSpec,
    "glyphs": GlyphsSpec,
}
IMAGE_FAMILIES = frozenset({"images", "glyphs"})


# --------------------------------------------------------------------------- models


class MLPSpec(StrictModel):
    """Fully connected network; the output size comes from the task family."""

    name: Literal["mlp"] = "mlp"
    hidden: list[Annotated[int, Field(ge=1, le=8192)]] = Field(
        default_factory=lambda: [40, 40], max_length=16, description="Hidden layer sizes.")
    activation: Literal["relu", "tanh", "gelu"] = "relu"


class Conv4Spec(StrictModel):
    """The standard few-shot backbone: 4 × [conv3×3 → norm → ReLU → max-pool 2]."""

    name: Literal["conv4"] = "conv4"
    filters: int = Field(64, ge=1, le=1024, description="Channels of every conv layer.")
    norm: Literal["batch", "layer", "none"] = Field(
        "batch", description="Per-task normalization (statistics of the current batch).")


ModelSpec = Annotated[Union[MLPSpec, Conv4Spec], Field(discriminator="name")]
MODELS: dict[str, type[StrictModel]] = {"mlp": MLPSpec, "conv4": Conv4Spec}


# --------------------------------------------------------------------------- the rest


class OuterOptimizerSpec(StrictModel):
    name: Literal["adam", "sgd"] = "adam"
    lr: LearningRate = Field(0.001, description="Outer (meta) learning rate.")


class EvaluationSpec(StrictModel):
    every: int = Field(500, ge=0, le=MAX_ITERATIONS,
                       description="Evaluate on validation tasks every N iterations (0: only at the end).")
    tasks: int = Field(600, ge=1, le=100_000, description="Held-out tasks per evaluation.")
    inner_steps: list[InnerSteps] = Field(default_factory=lambda: [1, 10], min_length=1,
                                          max_length=16,
                                          description="Adaptation step counts to report.")
    support_shots: int | None = Field(None, ge=1, le=MAX_SHOTS,
                                      description="Support shots at evaluation (default: training's).")


class ResourcesSpec(StrictModel):
    workers: int = Field(1, ge=1, le=MAX_WORKERS, description="Inner-loop workers (Ray actors).")
    cpus_per_worker: float = Field(1.0, gt=0.0, le=256.0)
    gpus_per_worker: float = Field(0.0, ge=0.0, le=16.0)
    task_chunk: int | None = Field(None, ge=1, le=MAX_META_BATCH,
                                   description="Tasks vectorized at once per worker (bounds memory).")


class JobSpec(StrictModel):
    """A meta-training job."""

    name: str | None = Field(None, max_length=200)
    algorithm: AlgorithmSpec
    task_family: TaskFamilySpec
    model: ModelSpec | None = Field(
        None, description="Network; default: conv4 for image families, mlp [40, 40] otherwise.")
    meta_batch_size: int = Field(25, ge=1, le=MAX_META_BATCH)
    iterations: int = Field(1000, ge=1, le=MAX_ITERATIONS)
    outer_optimizer: OuterOptimizerSpec = Field(default_factory=OuterOptimizerSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    checkpoint_every: int = Field(500, ge=1, le=MAX_ITERATIONS)
    log_every: int = Field(10, ge=1, le=MAX_ITERATIONS)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    max_attempts: int = Field(3, ge=1, le=20)

    @model_validator(mode="after")
    def _default_model(self) -> "JobSpec":
        if self.model is None:
            if self.task_family.name in IMAGE_FAMILIES:
                self.model = Conv4Spec()
            else:
                self.model = MLPSpec()
        return self

    @property
    def is_classification(self) -> bool:
        return self.task_family.name in IMAGE_FAMILIES
