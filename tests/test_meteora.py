"""MeteoRA-style gate (arXiv 2405.13053): per token, the router's top-k trained adapters, softmax-weighted;
the experts stay frozen, only the gate trains; the gate saves and reloads."""

import torch
from torch import nn

import loralab as ll
from loralab.compose import add_router


def model_with_experts():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    for i, name in enumerate(("math", "code")):
        ll.add_adapter(net, ll.AdapterSpec(r=2, alpha=4, targets=["0", "2"]), name=name)
        with torch.no_grad():
            for _, m in ll.model.methods_of(net, name):
                m.lora_B.normal_(generator=torch.Generator().manual_seed(i))
    return net


def test_each_token_takes_its_top_expert():
    net = model_with_experts()
    add_router(net, ["math", "code"], top_k=1)
    with torch.no_grad():
        net[0].adapters["router"].router.normal_()
        net[2].adapters["router"].router.normal_()
    x = torch.randn(5, 8)
    got = net(x)
    layer0 = net[0]
    h = []
    for row in x:  # layer 0 by hand: the top expert applies its ΔW, weighted by its softmax probability
        scores = layer0.adapters["router"].router @ row
        e = ["math", "code"][int(scores.argmax())]
        m = layer0.adapters[e]
        h.append(layer0.base_layer(row) + scores.softmax(0).max() * m.scale * m.lora_B @ m.lora_A @ row)
    h = torch.tanh(torch.stack(h))
    layer2 = net[2]
    want = []
    for row in h:
        scores = layer2.adapters["router"].router @ row
        e = ["math", "code"][int(scores.argmax())]
        m = layer2.adapters[e]
        want.append(layer2.base_layer(row) + scores.softmax(0).max() * m.scale * m.lora_B @ m.lora_A @ row)
    torch.testing.assert_close(got, torch.stack(want), atol=1e-5, rtol=1e-4)


def test_only_gate_trains_and_reloads(tmp_path):
    net = model_with_experts()
    add_router(net, ["math", "code"], top_k=2)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(".router." in n for n in trainable)
    with torch.no_grad():
        net[0].adapters["router"].router.normal_()
    x = torch.randn(3, 8)
    for name in ("math", "code", "router"):
        ll.save_adapter(net, tmp_path / name, name=name)
    fresh = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    fresh.load_state_dict({k.replace("base_layer.", ""): v for k, v in net.state_dict().items()
                           if "adapters" not in k})
    for name in ("math", "code", "router"):
        ll.load_adapter(fresh, tmp_path / name, name=name)
    torch.testing.assert_close(fresh(x), net(x), atol=1e-6, rtol=1e-5)


def test_a_top_1_gate_still_learns_from_the_task_loss():
    net = model_with_experts()
    add_router(net, ["math", "code"], top_k=1)
    net(torch.randn(6, 8)).pow(2).sum().backward()
    grads = [p.grad for n, p in net.named_parameters() if ".router." in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
