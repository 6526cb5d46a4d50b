"""The job spec: the one definition of a meta-training job.

Used by the API (request validation, ``/v1/algorithms``), the CLI (``metaserve train``)
and the engine. Unknown fields are errors, every number is bounded, NaN and infinity are
rejected, and every field has a default that works, so

    {"algorithm": {"name": "maml"}, "task_family": {"name": "sine"}}

is a complete job.

Its parts: :mod:`~metaserve.workers.spec_base` (the base model, the bounds specs share),
:mod:`~metaserve.workers.spec_algorithms`, :mod:`~metaserve.workers.spec_task_families`; this
module adds the models, joins the plugins and builds the unions and :class:`JobSpec`. Every name
of the parts is re-exported here: ``from metaserve.workers.spec import JobSpec, MAMLSpec``.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, StrictInt, ValidationInfo, field_validator, model_validator

from metaserve.workers.plugins import discover
from metaserve.workers.spec_algorithms import (  # noqa: F401 - re-exported
    ALGORITHMS, RL_ALGORITHMS, AlgorithmSpec, ANILSpec, FinetuneSpec, MAMLSpec, MetaSGDSpec,
    PEARLSpec, PolicyGradientSpec, PromptSpec, ProtoNetSpec, ReptileSpec, RL2Spec)
from metaserve.workers.spec_base import (  # noqa: F401 - re-exported
    CONTROL_CHARACTERS, CONV4_MIN_IMAGE_SIZE, MAX_INNER_STEPS, MAX_ITERATIONS, MAX_META_BATCH,
    MAX_SHOTS, MAX_WAYS, MAX_WORKERS, InnerSteps, LearningRate, StrictModel)
from metaserve.workers.spec_task_families import (  # noqa: F401 - re-exported
    DATASET_ID_PATTERN, IMAGE_FAMILIES, MAX_LAGS, RL_ALGORITHM_FAMILIES, RL_FAMILIES, TASK_FAMILIES,
    BanditSpec, ColumnName, GlyphsSpec, HalfCheetahVelSpec, ImagesSpec, LinearSpec, Nav2DSpec, Range,
    SineSpec, TabularMDPSpec, TabularSpec, TypefacesSpec)


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
