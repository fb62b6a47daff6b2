"""LoRAMoE (arXiv 2312.09979): per token, Σ over the router's top-k experts of softmax weight × s·B_e A_e x."""

import pytest
import torch
from method_harness import attached, check_param_count, check_save_load, check_training_lowers_loss
from trainer_toy import Toy, examples

import loralab as ll
from loralab.train import TrainConfig, Trainer

SPEC = dict(method="loramoe", r=2, alpha=4, targets=["layer"], options={"experts": 3, "top_k": 2})
KINDS = ("linear", "hf-conv1d")


def test_output_is_top_k_mixture_of_experts():
    net, m = attached(ll.AdapterSpec(**SPEC), "linear")
    x = net.sample()
    got = net(x)
    w = net.layer.base_layer.weight.detach()
    want = torch.empty_like(got)
    for i in range(x.shape[0]):
        for t in range(x.shape[1]):
            token = x[i, t]
            scores = m.router.detach() @ token
            best = scores.topk(2).indices
            weights = torch.softmax(scores[best], 0)
            delta = sum(weights[j] * 2.0 * m.experts_B[e] @ m.experts_A[e] @ token for j, e in enumerate(best))
            want[i, t] = w @ token + net.layer.base_layer.bias + delta
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_files_count_training(tmp_path):
    spec = ll.AdapterSpec(**SPEC)
    check_param_count(spec, lambda i, o: 3 * 2 * (i + o) + 3 * i, kinds=KINDS)
    check_save_load(spec, tmp_path, kinds=KINDS)
    check_training_lowers_loss(spec)


def test_merge_refused_and_balance_loss_reaches_trainer():
    net, _ = attached(ll.AdapterSpec(**SPEC), "linear")
    with pytest.raises(ValueError, match="no single ΔW"):
        ll.merge(net, "a")
    model = Toy(dropout=0.0)
    ll.add_adapter(model, ll.AdapterSpec(method="loramoe", r=2, targets=["hidden"], modules_to_save=["head"],
                                         options={"experts": 4, "top_k": 1, "balance": 1.0}))
    trainer = Trainer(model, examples(64), examples(32), TrainConfig(lr=1e-2, batch_size=16, max_steps=5,
                                                                     progress=False))
    from loralab.train.trainer import compute_loss

    batch = trainer._next_batch()
    plain = torch.nn.functional.cross_entropy(model(**batch), batch["labels"])
    total, _ = compute_loss(model, batch, "classification")
    assert total.item() > plain.item()  # the balance loss was added
    trainer.train()
