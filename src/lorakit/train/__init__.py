"""Supervised fine-tuning: the trainer, its config, and the memory-lean causal-LM loss."""

from lorakit.train.checkpoint import CheckpointError
from lorakit.train.config import TrainConfig
from lorakit.train.loss import chunked_causal_lm_loss
from lorakit.train.trainer import Trainer, TrainResult

__all__ = ["CheckpointError", "TrainConfig", "TrainResult", "Trainer", "chunked_causal_lm_loss"]
