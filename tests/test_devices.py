"""Device and dtype choice: auto picks the GPU when torch sees one; what is not there is refused clearly."""

import pytest
import torch

from loralab import cli
from loralab.devices import autocast, resolve_device, resolve_dtype


def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_auto_is_the_cpu_without_a_gpu(monkeypatch):
    no_gpu(monkeypatch)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")


def test_auto_prefers_cuda_when_torch_sees_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match="'cuda:2' is not available.*available: cpu, cuda, cuda:0, cuda:1"):
        resolve_device("cuda:2")


def test_under_torchrun_each_process_takes_its_own_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda:1")
    assert resolve_device("cuda:0") == torch.device("cuda:0")  # an explicit index wins
    assert resolve_device("cpu") == torch.device("cpu")


def test_a_missing_gpu_is_refused_naming_what_is_there(monkeypatch):
    no_gpu(monkeypatch)
    with pytest.raises(ValueError, match="'cuda' is not available.*available: cpu$"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device 'gpu0': use auto, cpu, cuda, cuda:N or mps"):
        resolve_device("gpu0")


def test_dtypes_by_name():
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype(None) is None
    with pytest.raises(ValueError, match="unknown dtype 'bf16'; allowed: float32, bfloat16, float16"):
        resolve_dtype("bf16")


def test_autocast_is_off_for_fp32_and_on_otherwise():
    x = torch.randn(4, 8)
    w = torch.randn(3, 8)
    with autocast(torch.device("cpu"), "fp32"):
        assert (x @ w.T).dtype == torch.float32
    with autocast(torch.device("cpu"), "bf16"):
        assert (x @ w.T).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16"):
        autocast(torch.device("cpu"), "tf32")


def test_cli_reports_a_missing_gpu(monkeypatch, capsys):
    no_gpu(monkeypatch)
    code = cli.main(["eval", "--task", "sst2", "--device", "cuda", "--max-test", "4"])
    assert code == 2
    assert "device 'cuda' is not available" in capsys.readouterr().err
