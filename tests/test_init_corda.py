"""CorDA (arXiv 2406.05223): W = U S (Vᵀ C⁻¹) from the SVD of W·C; the adapter takes the top
(IPM) or bottom (KPM) r components and W_res + s·BA = W."""

import pytest
import torch
from calib_toy import batches, with_init


@pytest.mark.parametrize("init, largest", [("corda", True), ("corda-kpm", False)])
def test_adapter_is_context_component(init, largest):
    calibration = batches()
    original, model, methods = with_init(init, calibration, targets=["first"])
    x = torch.cat([b["x"] for b in calibration]).double()
    cov = x.T @ x / x.shape[0]
    cov = cov + 1e-4 * cov.diagonal().mean() * torch.eye(12, dtype=torch.double)
    w = original.first.weight.detach().double()
    u, s, vh = torch.linalg.svd(w @ cov, full_matrices=False)
    pick = slice(0, 3) if largest else slice(7, 10)
    expected = u[:, pick] @ torch.diag(s[pick]) @ vh[pick] @ torch.linalg.inv(cov)
    m = methods["first"]
    got = 2.0 * m.lora_B.double() @ m.lora_A.double()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(model.first.base_layer.weight.double() + got, w, atol=1e-5, rtol=1e-5)
