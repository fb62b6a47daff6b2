"""EVA (arXiv 2410.07170): A spans the top activation directions of each layer's inputs; B = 0."""

import pytest
import torch
from calib_toy import CalibNet, batches, with_init

import loralab as ll


def test_a_spans_top_input_directions():
    directions = torch.linalg.qr(torch.randn(12, 3, generator=torch.Generator().manual_seed(2)))[0].T  # [3, 12]
    original, model, methods = with_init("eva", batches(directions=directions), targets=["first"])
    a = methods["first"].lora_A.detach()
    projector = a.T @ torch.linalg.pinv(a.T)  # onto span of A's rows
    torch.testing.assert_close(projector @ directions.T, directions.T, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(a @ a.T, torch.eye(3), atol=1e-5, rtol=1e-5)  # orthonormal rows
    assert torch.count_nonzero(methods["first"].lora_B) == 0
    x = batches(1)[0]["x"]
    torch.testing.assert_close(model(x).logits, original(x).logits)


def test_needs_calibration_data():
    with pytest.raises(ValueError, match="needs calibration data"):
        ll.add_adapter(CalibNet(), ll.AdapterSpec(r=2, targets=["first"], init="eva"))
