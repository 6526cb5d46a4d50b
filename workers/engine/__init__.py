"""The meta-learning engine: :class:`Trainer` (in-process loop, and the shard/apply pieces the Ray
runner calls), checkpoints and the meta-initialization artifact."""

from __future__ import annotations

from metaserve.workers.engine.artifacts import MetaInitModel, adapt, load_meta_init
from metaserve.workers.engine.checkpoints import CheckpointError
from metaserve.workers.engine.state import ShardResult, TrainState
from metaserve.workers.engine.trainer import Trainer

__all__ = ["CheckpointError", "MetaInitModel", "ShardResult", "TrainState", "Trainer", "adapt", "load_meta_init"]
