"""Merging adapters: each method against a direct computation on dense ΔW written here."""

import pytest
import torch
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

import loralab as ll
from loralab.compose import combine, combine_folders
from loralab.model import methods_of


def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def two_adapters(ranks=(2, 3), targets=("q_proj", "v_proj")):
    model = llama()
    for i, r in enumerate(ranks):
        ll.add_adapter(model, ll.AdapterSpec(r=r, alpha=2 * r, targets=list(targets)), name=f"t{i}")
        with torch.no_grad():
            for _, m in methods_of(model, f"t{i}"):
                m.lora_B.normal_(generator=torch.Generator().manual_seed(10 + i))
    return model


def dense(model, name):
    return {p: (m.scale * m.lora_B @ m.lora_A).detach() for p, m in methods_of(model, name)}


def best_rank(delta, k):
    u, s, vh = torch.linalg.svd(delta)
    return u[:, :k] @ torch.diag(s[:k]) @ vh[:k]


def top(delta, density):
    k = round(density * delta.numel())
    threshold = delta.abs().flatten().sort(descending=True).values[k - 1]
    return delta * (delta.abs() >= threshold)


def ties_reference(deltas, density):
    trimmed = [top(d, density) for d in deltas]
    sign = torch.sign(sum(trimmed))
    merged = torch.zeros_like(deltas[0])
    for i in range(merged.shape[0]):
        for j in range(merged.shape[1]):
            agreeing = [t[i, j] for t in trimmed if t[i, j] != 0 and torch.sign(t[i, j]) == sign[i, j]]
            merged[i, j] = sum(agreeing) / len(agreeing) if agreeing else 0.0
    return merged


@pytest.mark.parametrize("method", ["linear", "cat"])
def test_linear_and_cat_are_exact_weighted_sums(method):
    model = two_adapters()
    combine(model, ["t0", "t1"], method=method, weights=[0.7, -0.3], name="m")
    want = {p: 0.7 * dense(model, "t0")[p] - 0.3 * dense(model, "t1")[p] for p in dense(model, "t0")}
    for p, got in dense(model, "m").items():
        torch.testing.assert_close(got, want[p], atol=1e-5, rtol=1e-4)
    assert ll.get_spec(model, "m").r == 5


def test_svd_is_best_rank_k_of_the_sum():
    model = two_adapters()
    combine(model, ["t0", "t1"], method="svd", rank=2, name="m")
    for p, got in dense(model, "m").items():
        want = best_rank(dense(model, "t0")[p] + dense(model, "t1")[p], 2)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)


def test_ties_matches_trim_elect_disjoint_mean():
    model = two_adapters()
    combine(model, ["t0", "t1"], method="ties", density=0.4, name="m")
    for p, got in dense(model, "m").items():
        want = ties_reference([dense(model, "t0")[p], dense(model, "t1")[p]], 0.4)
        want = best_rank(want, 5)  # re-factorised to Σ r_i = 5
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)


def test_magnitude_prune_and_dare():
    model = two_adapters()
    combine(model, ["t0", "t1"], method="magnitude-prune", density=0.3, name="mp")
    for p, got in dense(model, "mp").items():
        want = best_rank(top(dense(model, "t0")[p] + dense(model, "t1")[p], 0.3), 5)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)
    combine(model, ["t0", "t1"], method="dare", density=1.0, name="d1")  # density 1 drops nothing
    for p, got in dense(model, "d1").items():
        torch.testing.assert_close(got, dense(model, "t0")[p] + dense(model, "t1")[p], atol=1e-4, rtol=1e-3)
    combine(model, ["t0", "t1"], method="dare", density=0.5, seed=1, name="d5")
    combine(model, ["t0", "t1"], method="dare", density=0.5, seed=1, name="d5b")
    for p in dense(model, "d5"):
        torch.testing.assert_close(dense(model, "d5")[p], dense(model, "d5b")[p])  # seeded


def test_lora_lego_recovers_shared_units():
    model = llama()
    g = torch.Generator().manual_seed(0)
    units_a, units_b = torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g)
    for name in ("t0", "t1"):  # both adapters hold the same two rank-one units
        ll.add_adapter(model, ll.AdapterSpec(r=2, alpha=2, targets=["q_proj"]), name=name)
        with torch.no_grad():
            for _, m in methods_of(model, name):
                m.lora_A.copy_(units_a)
                m.lora_B.copy_(units_b[: m.lora_B.shape[0]])
    combine(model, ["t0", "t1"], method="lora-lego", rank=2, name="m")
    for p, got in dense(model, "m").items():
        torch.testing.assert_close(got, dense(model, "t0")[p] + dense(model, "t1")[p], atol=1e-4, rtol=1e-3)


def test_folders_merge_without_a_model_and_load_in_peft(tmp_path):
    model = two_adapters()
    for name in ("t0", "t1"):
        ll.save_adapter(model, tmp_path / name, name=name)
    combine_folders([tmp_path / "t0", tmp_path / "t1"], tmp_path / "m", method="linear", weights=[1.0, 0.5])
    ours = llama()
    ll.load_adapter(ours, tmp_path / "m")
    theirs = PeftModel.from_pretrained(llama(), tmp_path / "m").eval()
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=1e-4)
    ref = {p: dense(model, "t0")[p] + 0.5 * dense(model, "t1")[p] for p in dense(model, "t0")}
    for p, got in dense(ours, "default").items():
        torch.testing.assert_close(got, ref[p], atol=1e-5, rtol=1e-4)


def test_bad_input(tmp_path):
    model = two_adapters()
    with pytest.raises(ValueError, match="2 weights for"):
        combine(model, ["t0"], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="density"):
        combine(model, ["t0", "t1"], method="ties", density=1.5)
    with pytest.raises(ValueError, match="sum of the adapters' ranks"):
        combine(model, ["t0", "t1"], method="svd", rank=6)
    with pytest.raises(ValueError, match="did you mean: ties"):
        combine(model, ["t0", "t1"], method="tie")
    ll.add_adapter(model, ll.AdapterSpec(r=2, targets=["q_proj"]), name="q_only")
    with pytest.raises(ValueError, match="allow_partial"):
        combine(model, ["t0", "q_only"])
    combine(model, ["t0", "q_only"], allow_partial=True, name="partial")
