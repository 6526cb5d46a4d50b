"""The meta-learning engine: :class:`Trainer` (in-process loop, and the shard/apply pieces the Ray
runner calls), the one schedule every job kind runs on (:mod:`~metaserve.workers.engine.loop`),
the one checkpoint format (:mod:`~metaserve.workers.engine.checkpoints`) and the one artifact
writer (:mod:`~metaserve.workers.engine.final_artifact`)."""

from __future__ import annotations

from metaserve.workers.engine.final_artifact import MetaInitModel, adapt, load_meta_init
from metaserve.workers.engine.checkpoints import CheckpointError
from metaserve.workers.engine.state import ShardResult, TrainState
from metaserve.workers.engine.trainer import Trainer

__all__ = ["CheckpointError", "MetaInitModel", "ShardResult", "TrainState", "Trainer", "adapt", "load_meta_init"]
