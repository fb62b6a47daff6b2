"""Training: the Trainer, its config, optimisers (optim/) and rank schedules (rank/)."""

from loralab.train.trainer import TrainConfig, Trainer

__all__ = ["TrainConfig", "Trainer"]
