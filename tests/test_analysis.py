"""Analysis measures on matrices with a known answer, and the report on a real adapter folder."""

import torch
from torch import nn

import loralab as ll
from loralab.analysis.measures import effective_rank, factor_singular_values, intruder_dimensions, subspace_similarity
from loralab.analysis.report import analyze, measure


def test_factor_singular_values_equal_dense_ones():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 9, generator=g), torch.randn(7, 3, generator=g)
    dense = torch.linalg.svdvals((2.0 * b @ a).double())
    torch.testing.assert_close(factor_singular_values(a, b, 2.0), dense[:3], atol=1e-4, rtol=1e-5)
    assert dense[3:].abs().max() < 1e-4  # float32 product: rank 3 up to round-off


def test_effective_rank_of_flat_and_single_spectra():
    assert abs(effective_rank(torch.ones(4)) - 4.0) < 1e-9
    assert abs(effective_rank(torch.tensor([5.0, 0.0, 0.0])) - 1.0) < 1e-9


def test_intruder_dimensions():
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g))
    base = q @ torch.diag(torch.linspace(10, 1, 20)) @ q.T  # W's singular vectors: the columns of q
    v = q.sum(1, keepdim=True) / 20**0.5  # cos 1/√20 ≈ 0.22 with every one of them
    outside = 50 * v @ v.T
    assert intruder_dimensions(base, base + outside, top_k=10, epsilon=0.5) == 1
    inside = 3 * q[:, :1] @ q[:, :1].T
    assert intruder_dimensions(base, base + inside, top_k=10, epsilon=0.5) == 0


def test_subspace_similarity_identical_and_orthogonal():
    g = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    a = q[:, :3].T * torch.tensor([3.0, 2.0, 1.0])[:, None]
    same = subspace_similarity(a, a)
    torch.testing.assert_close(same.diagonal(), torch.ones(3, dtype=torch.double))
    orthogonal = subspace_similarity(a, q[:, 5:8].T)
    assert orthogonal.abs().max() < 1e-10


def test_report_on_adapter_folders(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 8))
    for name in ("a", "b"):
        ll.add_adapter(net, ll.AdapterSpec(r=4, targets=["0", "2"]), name=name)
        with torch.no_grad():
            for _, m in ll.model.methods_of(net, name):
                m.lora_B.normal_()
        ll.save_adapter(net, tmp_path / name, name=name)
    result = measure(tmp_path / "a", other=tmp_path / "b")
    assert [layer.module for layer in result.layers] == ["0", "2"]
    assert all(layer.similarity is not None for layer in result.layers)
    report = analyze(tmp_path / "a", tmp_path / "report", other=tmp_path / "b")
    text = report.read_text()
    assert "data:image/png;base64" in text and "effective rank" in text
    assert (tmp_path / "report" / "similarity.png").stat().st_size > 1000


def test_factors_carry_each_layers_own_scale(tmp_path):
    from loralab.analysis.report import lora_factors

    m = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 6))
    ll.add_adapter(m, ll.AdapterSpec(r=2, alpha=4, targets=["0", "1"], rank_pattern={"1": 4}, alpha_pattern={"0": 1}))
    ll.save_adapter(m, tmp_path)
    _, found = lora_factors(tmp_path)
    assert {k: (a.shape[0], s) for k, (a, _, s) in found.items()} == {"0": (2, 0.5), "1": (4, 1.0)}
