"""Run by test_trainer_ddp.py under torchrun: train the toy and save the trainable weights (rank 0)."""

import sys

import torch
from safetensors.torch import save_file
from trainer_toy import adapted_toy, examples, trainable_state

from loralab.train import TrainConfig, Trainer

if __name__ == "__main__":
    torch.set_num_threads(1)
    model = adapted_toy(dropout=0.0)
    config = TrainConfig(lr=5e-2, batch_size=8, max_steps=3, progress=False, schedule="constant")
    trainer = Trainer(model, examples(64), examples(16), config)
    metrics = trainer.train()
    if trainer.rank == 0:
        save_file({k: v.contiguous() for k, v in trainable_state(model).items()}, sys.argv[1])
        print("eval", metrics)
