"""LoRA-GA (arXiv 2407.05000): the first LoRA step's change to W, s·(B·g_A + g_B·A), is
proportional to the best rank-2r approximation of the full gradient G."""

import pytest
import torch
from calib_toy import CalibNet, batches, with_init

import loralab as ll


def test_first_step_follows_top_2r_gradient_directions():
    calibration = batches()
    original, model, methods = with_init("lora-ga", calibration, r=2, targets=["first"])
    # G: the full gradient of the original model, averaged over the same batches
    w = original.first.weight
    w.requires_grad_(True)
    for b in calibration:
        (original(**b).loss / len(calibration)).backward()
    g = w.grad.double()
    for b in calibration:
        (model(**b).loss / len(calibration)).backward()
    m = methods["first"]
    s = 2.0
    step = s * (m.lora_B.double() @ m.lora_A.grad.double() + m.lora_B.grad.double() @ m.lora_A.double())
    u, sv, vh = torch.linalg.svd(g, full_matrices=False)
    best = u[:, :4] @ torch.diag(sv[:4]) @ vh[:4]
    zeta2 = 10 ** 0.5 / 16  # ζ² = out^{1/2} / γ
    torch.testing.assert_close(step, s * s * zeta2 * best, atol=1e-6, rtol=1e-3)
    x = calibration[0]["x"]
    torch.testing.assert_close(model(x).logits, original(x).logits, atol=1e-5, rtol=1e-5)


def test_rank_too_large_for_2r():
    with pytest.raises(ValueError, match="2r"):
        ll.add_adapter(CalibNet(), ll.AdapterSpec(r=6, targets=["second"], init="lora-ga"), calibration=batches())
