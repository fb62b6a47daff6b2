"""BGMV and SGMV against a row-by-row loop over each row's own adapter (ranks differ, some rows base-only)."""

import pytest
import torch

from loralab.serve.batched_lora import bgmv, sgmv, stack_factors


@pytest.mark.parametrize("kernel", [bgmv, sgmv])
def test_each_row_gets_its_own_adapter(kernel):
    g = torch.Generator().manual_seed(0)
    factors = [(torch.randn(r, 16, generator=g), torch.randn(12, r, generator=g), s)
               for r, s in ((2, 1.0), (8, 0.5), (4, 2.0))]
    a_stack, b_stack = stack_factors(factors)
    x = torch.randn(6, 5, 16, generator=g)
    idx = torch.tensor([2, -1, 0, 2, 1, -1])
    got = kernel(x, a_stack, b_stack, idx)
    for i, slot in enumerate(idx.tolist()):
        if slot < 0:
            assert torch.count_nonzero(got[i]) == 0
        else:
            a, b, s = factors[slot]
            torch.testing.assert_close(got[i], s * x[i] @ a.T @ b.T, atol=1e-4, rtol=1e-4)
