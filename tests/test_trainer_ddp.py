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


# What a run that lost its port or connection to another process on a busy machine prints: such a run is
# tried once more (on a fresh port); any other failure fails the test.
TRANSIENT = ("Address already in use", "EADDRINUSE", "Connection reset by peer", "Connection refused")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    for _ in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", str(script), *args]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        if done.returncode == 0 or not any(marker in done.stderr for marker in TRANSIENT):
            break
    return done


@pytest.mark.slow
def test_two_process_ddp_equals_single_process(tmp_path):
    out = tmp_path / "ddp.safetensors"
    done = torchrun(HERE / "ddp_train_script.py", str(out))
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
