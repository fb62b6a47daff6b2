"""MiCA (arXiv 2604.01694): B = W's r minor left singular vectors, frozen; A = 0 and alone trains; PEFT's
init_lora_weights="mica" files both ways."""

import copy

import torch
from init_harness import init_model, model, singular
from peft import LoraConfig, PeftModel, get_peft_model

import loralab as ll

X = torch.randn(4, 12, generator=torch.Generator().manual_seed(1))


def test_b_is_the_minor_subspace_a_is_zero_and_the_output_the_bases():
    original, m, methods = init_model("mica")
    for path, method in methods:
        u, _, _ = singular(path, original)
        torch.testing.assert_close(method.lora_B.abs(), u[:, -3:].abs(), atol=1e-5, rtol=1e-5)  # (up to sign)
        assert torch.equal(method.lora_A, torch.zeros_like(method.lora_A))
    torch.testing.assert_close(m(X), original(X))


def test_only_a_trains_even_after_the_active_adapters_change():
    _, m, methods = init_model("mica")
    ll.add_adapter(m, ll.AdapterSpec(r=2, targets=["0"]), name="other")
    ll.set_active(m, "default")
    trained = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trained == {"0.adapters.default.lora_A", "2.adapters.default.lora_A"}
    before = {p: method.lora_B.clone() for p, method in methods}
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        m(X).pow(2).mean().backward()
        opt.step()
    for path, method in methods:
        assert torch.equal(method.lora_B, before[path]) and method.lora_A.abs().max() > 0


def randomised_a(m):
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_A" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    return m


def test_peft_reads_ours_with_b_frozen(tmp_path):
    _, ours, _ = init_model("mica")
    randomised_a(ours)
    ll.save_adapter(ours, tmp_path)
    assert ll.read_config(tmp_path)["init_lora_weights"] == "mica"
    theirs = PeftModel.from_pretrained(model(), tmp_path, is_trainable=True)
    torch.testing.assert_close(theirs(X), ours(X), atol=1e-6, rtol=1e-6)
    assert not any(p.requires_grad for n, p in theirs.named_parameters() if "lora_B" in n)


def test_we_read_peft_with_b_frozen(tmp_path):
    theirs = get_peft_model(model(), LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"], init_lora_weights="mica"))
    randomised_a(theirs)
    theirs.save_pretrained(tmp_path)
    ours = ll.load_adapter(copy.deepcopy(model()), tmp_path)
    assert ll.get_spec(ours, "default").init == "mica"
    torch.testing.assert_close(ours(X), theirs(X), atol=1e-6, rtol=1e-6)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {"0.adapters.default.lora_A",
                                                                          "2.adapters.default.lora_A"}
