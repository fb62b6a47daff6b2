"""torchrun with two processes (DDP, gloo) reaches the same weights as one process with the same global batch."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainer_toy import adapted_toy, examples, trainable_state

from loralab.train import TrainConfig, Trainer

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_equals_single_process(tmp_path):
    out = tmp_path / "ddp.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(HERE / "ddp_train_script.py"), str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = load_file(str(out))
    model = adapted_toy(dropout=0.0)
    Trainer(model, examples(64), None, TrainConfig(lr=5e-2, batch_size=8, max_steps=3, progress=False,
                                                   schedule="constant")).train()
    single = trainable_state(model)
    assert set(ddp) == set(single)
    for name, value in single.items():
        torch.testing.assert_close(ddp[name], value, atol=1e-5, rtol=1e-4)
    moved = adapted_toy(dropout=0.0)
    assert any(not torch.allclose(p, single[n]) for n, p in trainable_state(moved).items())
