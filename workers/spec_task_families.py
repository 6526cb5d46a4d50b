"""The task families a job may name (``task_family: {name: ...}``), built in, each with its own
typed parameters, and the registry :data:`TASK_FAMILIES` that plugins join
(:mod:`metaserve.workers.plugins`; the union is built in :mod:`metaserve.workers.spec`, which
re-exports every name here)."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import Field, StrictInt, model_validator

from metaserve.workers.spec_base import MAX_SHOTS, MAX_WAYS, StrictModel


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
    split by Unicode script group, with no character identity (NFKD) or near-duplicate in two
    splits (docs/DATASETS.md). 1 to 5 support shots."""

    name: Literal["typefaces"] = "typefaces"
    distortion: float = Field(1.0, ge=0.0, le=3.0, description="Strength of the elastic and "
                              "affine jitter.")
    stroke_jitter: float = Field(0.5, ge=0.0, le=1.0, description="Probability that an image's "
                                 "strokes are thinned or thickened by a pixel.")
    split_seed: StrictInt = Field(0, ge=0, le=2**31 - 1, description="Shuffles the script "
                                  "groups before they are assigned to train/val/test.")


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
