"""`summarize` reads an adapter folder alone; its norms match dense ΔW computed here."""

import torch
from torch import nn

import loralab as ll
from loralab.inspect_adapter import summarize


def test_summary_matches_dense_delta(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 6), nn.Conv2d(2, 3, 3), nn.Embedding(10, 4))
    ll.add_adapter(m, ll.AdapterSpec(r=2, alpha=5, targets=["0", "1", "2"]))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_()
    ll.save_adapter(m, tmp_path)
    s = summarize(tmp_path)
    assert s.method == "lora" and s.params == sum(p.numel() for p in m.parameters() if p.requires_grad)
    by_module = {layer.module: layer for layer in s.layers}
    for name in ("0", "1", "2"):
        method = m.get_submodule(name).adapters["default"]
        dense = (2.5 * method.lora_B @ method.lora_A).norm().item()
        assert abs(by_module[name].delta_norm - dense) < 1e-4 * max(dense, 1)


def test_rank_and_alpha_of_a_method_in_its_own_peft_format(tmp_path):
    """LoHa's config calls them r and alpha (not lora_alpha): the summary reads them as the method does."""
    m = nn.Sequential(nn.Linear(8, 6))
    ll.add_adapter(m, ll.AdapterSpec(method="loha", r=3, alpha=7, targets=["0"]))
    ll.save_adapter(m, tmp_path)
    s = summarize(tmp_path)
    assert s.config["peft_type"] == "LOHA" and "lora_alpha" not in s.config
    assert (s.method, s.r, s.alpha, s.rslora) == ("loha", 3, 7.0, False)


def test_per_layer_ranks_and_scales_are_each_layers_own(tmp_path):
    """With rank_pattern / alpha_pattern each layer's ‖s·BA‖ uses its own scale (dense ΔW written here)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 6))
    ll.add_adapter(m, ll.AdapterSpec(r=2, alpha=4, targets=["0", "1"], rank_pattern={"1": 4}, alpha_pattern={"0": 1}))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_()
    ll.save_adapter(m, tmp_path)
    by_module = {layer.module: layer for layer in summarize(tmp_path).layers}
    for name, scale in (("0", 1 / 2), ("1", 4 / 4)):
        method = m.get_submodule(name).adapters["default"]
        dense = (scale * method.lora_B @ method.lora_A).norm().item()
        assert abs(by_module[name].delta_norm - dense) < 1e-4 * max(dense, 1)


def test_gated_and_diagonal_factors_count_their_diagonal(tmp_path):
    """SoRA's gate and KaSA's Δσ sit between B and A: the norm is ‖s·B·diag(d)·A‖ (dense here), and analyze's
    singular values are those of that product."""
    from loralab.analysis.report import measure

    for method in ("sora", "kasa"):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(8, 6))
        ll.add_adapter(m, ll.AdapterSpec(method=method, r=2, alpha=4, targets=["0"]))
        layer = m[0].adapters["default"]
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_()
        b, d, a = ((layer.lora_B, layer.lora_gate, layer.lora_A) if method == "sora"
                   else (layer.kasa_U, layer.kasa_sigma, layer.kasa_V))
        dense = 2.0 * (b * d) @ a
        ll.save_adapter(m, tmp_path / method)
        (summary,) = summarize(tmp_path / method).layers
        assert abs(summary.delta_norm - dense.norm().item()) < 1e-4 * dense.norm().item(), method
        (stats,) = measure(tmp_path / method).layers
        want = torch.linalg.svdvals(dense.detach().double())[:2]
        torch.testing.assert_close(torch.tensor(stats.singular_values[:2], dtype=torch.double), want, rtol=1e-4,
                                   atol=1e-6)
