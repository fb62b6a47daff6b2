"""EVA (arXiv 2410.07170): A spans the top activation directions of each layer's inputs; B = 0; with rho > 1
ranks move to the layers whose inputs concentrate their variance, and the adapter saves as PEFT reads it."""

import pytest
import torch
from calib_toy import CalibNet, batches, with_init
from torch import nn

import loralab as ll
from loralab.checkpoint import spec_from_config
from loralab.model import methods_of


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


# ---- rank redistribution (option rho) -------------------------------------------------------------
# Three parallel layers whose inputs have exactly these covariance spectra (diagonal, so the
# eigenvectors are the standard basis); r = 2 each, so the budget is 6 and rho = 2 caps a layer at 4.
SPECTRA = {"a": [0.5, 0.3, 0.15, 0.05, 0, 0, 0, 0], "b": [0.125] * 8, "c": [0.7, 0.2, 0.1, 0, 0, 0, 0, 0]}
# by hand: each layer keeps its top ratio; the other 3 units go to a's 0.3, c's 0.2, a's 0.15
EXPECTED = {"a": 3, "b": 1, "c": 2}


class Parallel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(8, 6), nn.Linear(8, 6), nn.Linear(8, 6)

    def forward(self, x: torch.Tensor, labels=None) -> torch.Tensor:
        return torch.cat([self.a(x[:, 0]), self.b(x[:, 1]), self.c(x[:, 2])], dim=-1)


def spectrum_batches(n: int = 64) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    parts = []
    for values in SPECTRA.values():
        q = torch.linalg.qr(torch.randn(n, 8, generator=g, dtype=torch.float64))[0]  # orthonormal columns
        parts.append((q * (n * torch.tensor(values, dtype=torch.float64)).sqrt()).float())  # XᵀX / n = diag
    return [{"x": torch.stack(parts, dim=1)}]


def eva_model(rho):
    model = Parallel()
    spec = ll.AdapterSpec(r=2, alpha=4, targets=["a", "b", "c"], init="eva", init_options={"rho": rho})
    ll.add_adapter(model, spec, calibration=spectrum_batches())
    return model, dict(methods_of(model, "default"))


def test_ranks_follow_explained_variance_and_sum_to_the_budget():
    _, methods = eva_model(rho=2)
    assert {p: m.r for p, m in methods.items()} == EXPECTED
    assert sum(m.r for m in methods.values()) == 2 * 3
    for path in ("a", "c"):  # A = the top-k eigenvectors: e_1 … e_k
        a = methods[path].lora_A.detach()
        assert a.shape == (EXPECTED[path], 8)
        torch.testing.assert_close(a.abs(), torch.eye(8)[: EXPECTED[path]], atol=1e-5, rtol=0)
    for m in methods.values():
        assert m.lora_B.shape == (6, m.r) and torch.count_nonzero(m.lora_B) == 0
        assert m.scale == 2.0  # alpha / r for every layer, whatever its rank
        assert m.expected_trainable_params() == m.r * (8 + 6)


def test_rho_one_keeps_every_layer_at_r():
    _, methods = eva_model(rho=1)
    assert {m.r for m in methods.values()} == {2}


def with_trained_b(model):
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def test_redistributed_adapter_saves_and_loads_in_loralab_and_peft(tmp_path):
    from peft import PeftModel

    model = with_trained_b(eva_model(rho=2)[0])
    x = spectrum_batches()[0]["x"][:5]
    want = model(x)
    ll.save_adapter(model, tmp_path)
    config = ll.read_config(tmp_path)
    assert config["r"] == 2 and config["rank_pattern"] == {"a": 3, "b": 1}
    again = Parallel()
    ll.load_adapter(again, tmp_path)
    assert {p: m.r for p, m in methods_of(again, "default")} == EXPECTED
    torch.testing.assert_close(again(x), want)
    peft_model = PeftModel.from_pretrained(Parallel(), tmp_path).eval()
    assert {p: peft_model.base_model.model.get_submodule(p).lora_A["default"].weight.shape[0]
            for p in "abc"} == EXPECTED
    torch.testing.assert_close(peft_model(x), want, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(Parallel()(x), want, atol=1e-3)


def test_peft_written_rank_and_alpha_patterns_load(tmp_path):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, lora_alpha=4, target_modules=["a", "b", "c"], rank_pattern={"b": 5, "c": 1},
                        alpha_pattern={"c": 7.0}, init_lora_weights=False)
    peft_model = with_trained_b(get_peft_model(Parallel(), config)).eval()
    x = spectrum_batches()[0]["x"][:5]
    peft_model.save_pretrained(tmp_path)
    ours = ll.load_adapter(Parallel(), tmp_path)
    assert {p: m.r for p, m in methods_of(ours, "default")} == {"a": 2, "b": 5, "c": 1}
    assert dict(methods_of(ours, "default"))["c"].scale == 7.0
    torch.testing.assert_close(ours(x), peft_model(x), atol=1e-6, rtol=1e-5)


def test_redistribution_options_refused():
    with pytest.raises(ValueError, match="rho must be a number >= 1"):
        eva_model(rho=0.5)
    spec = ll.AdapterSpec(method="sora", r=2, targets=["a"], init="eva", init_options={"rho": 2})
    with pytest.raises(ValueError, match="needs per-layer ranks, which method 'sora' at a does not support"):
        ll.add_adapter(Parallel(), spec, calibration=spectrum_batches())
    config = {"peft_type": "LORA", "r": 2, "target_modules": ["a"], "rank_pattern": {"a": 3}}
    assert spec_from_config(config).for_layer("a").r == 3  # every reader sees the layer's own rank
