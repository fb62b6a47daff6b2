"""DoRA (arXiv 2402.09353) against W' = m · (W + sBA) / ‖W + sBA‖_row written here."""

import pytest
import torch
from method_harness import (
    Net,
    attached,
    base_matrix,
    check_forward,
    check_merge_roundtrip,
    check_param_count,
    check_peft_reads,
    check_reads_peft,
    check_save_load,
    check_training_lowers_loss,
    dense_forward,
    randomise_trainables,
)
from peft import LoraConfig
from torch import nn
from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

import loralab as ll

KINDS = ("linear", "hf-conv1d", "conv", "embedding")  # (a scaled embedding too: method_harness)
SPEC = dict(method="dora", r=3, alpha=6, targets=["layer"])


def dora_delta(method, w):
    combined = w + (6 / 3) * method.lora_B @ method.lora_A
    return method.magnitude[:, None] * combined / combined.norm(dim=1, keepdim=True) - w


def test_forward_equals_paper_formula():
    check_forward(ll.AdapterSpec(**SPEC), dora_delta, kinds=KINDS)


def test_merge_unmerge_restores_weights():
    check_merge_roundtrip(ll.AdapterSpec(**SPEC), kinds=KINDS)


def test_param_count_adds_one_magnitude_per_row():
    check_param_count(ll.AdapterSpec(**SPEC), lambda i, o: 3 * (i + o) + o, kinds=KINDS)


def test_save_load_roundtrip(tmp_path):
    check_save_load(ll.AdapterSpec(**SPEC), tmp_path, kinds=KINDS)


def test_training_lowers_loss():
    check_training_lowers_loss(ll.AdapterSpec(**SPEC))


def test_magnitude_starts_at_row_norms_and_output_unchanged():
    net, method = attached(ll.AdapterSpec(**SPEC), "linear", randomize=False)
    torch.testing.assert_close(method.magnitude.detach(), base_matrix(net).norm(dim=1))


def test_fast_row_norms_equal_dense_norms():
    _, method = attached(ll.AdapterSpec(**SPEC), "linear")
    w = base_matrix(_)
    dense = (w + 2.0 * method.lora_B @ method.lora_A).norm(dim=1)
    torch.testing.assert_close(method.row_norms(), dense.detach(), atol=1e-5, rtol=1e-5)


class TinyLM(nn.Module):
    """An embedding (plain, or scaled as Gemma 3's) and a head: DoRA on the embedding, checked against PEFT."""

    def __init__(self, scaled: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = Gemma3TextScaledWordEmbedding(30, 8, 0, embed_scale=3.0) if scaled else nn.Embedding(30, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


IDS = torch.randint(0, 30, (3, 6), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("scaled", [False, True])
def test_embedding_magnitude_is_per_dimension_as_in_peft(tmp_path, scaled):
    net = ll.add_adapter(TinyLM(scaled), ll.AdapterSpec(method="dora", r=2, alpha=4, targets=["embed", "head"]))
    method = net.embed.adapters["default"]
    torch.testing.assert_close(method.magnitude.detach(), net.embed.base_layer.weight.norm(dim=0))  # [dim]
    randomise_trainables(net)
    check_peft_reads(tmp_path / "ours", net, lambda: TinyLM(scaled), IDS)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["embed", "head"], use_dora=True)
    check_reads_peft(tmp_path / "theirs", config, lambda: TinyLM(scaled), IDS)


def test_no_dropout_on_embedding_indices():
    net, method = attached(ll.AdapterSpec(**{**SPEC, "dropout": 0.5}), "embedding")
    net.train()
    x = net.sample()
    torch.testing.assert_close(net(x), _expected(net, method, x), atol=1e-5, rtol=1e-5)


def test_residual_inits_keep_the_base_output():
    """PiSSA/OLoRA move s·B₀A₀ out of W after DoRA took ‖W‖: the output at init must still be the base's."""
    for init in ("pissa", "olora"):
        net = Net("linear")
        x = net.sample()
        expected = net(x)
        ll.add_adapter(net, ll.AdapterSpec(**{**SPEC, "init": init}))
        torch.testing.assert_close(net(x), expected, atol=1e-5, rtol=1e-5, msg=init)


def test_an_adapter_merged_under_it_changes_the_norms_dora_uses():
    net, method = attached(ll.AdapterSpec(**SPEC), "linear")
    ll.add_adapter(net, ll.AdapterSpec(method="lora", r=2, alpha=2, targets=["layer"]), name="other",
                   activate=False)
    with torch.no_grad():
        net.layer.adapters["other"].lora_B.normal_(std=0.5)
    x = net.sample()
    net(x)  # ‖W‖² is computed and cached
    ll.merge(net, "other")
    w = base_matrix(net)  # W with the other adapter folded in
    torch.testing.assert_close(net(x), dense_forward(net, x, w + dora_delta(method, w)), atol=1e-4, rtol=1e-4)


def _expected(net, method, x):
    w = base_matrix(net)
    return dense_forward(net, x, w + dora_delta(method, w))


def test_norms_kept_without_gradients_follow_every_in_place_change():
    """Inference keeps ‖W + sBA‖ between forwards; an in-place write to A, B or W, or another
    scale, must still reach the output (the reference recomputes the norms densely each time)."""
    net, method = attached(ll.AdapterSpec(**SPEC), "linear")
    x = net.sample()
    with torch.no_grad():
        net(x)
        assert method.row_norms() is method.row_norms()  # kept, not recomputed
        for change in (lambda: method.lora_A.mul_(1.5), lambda: method.lora_B.add_(0.3),
                       lambda: net.layer.base_layer.weight.mul_(0.7)):
            change()
            torch.testing.assert_close(net(x), _expected(net, method, x), atol=1e-5, rtol=1e-5)
        method.scale = 3.0
        w = base_matrix(net)
        combined = w + 3.0 * method.lora_B @ method.lora_A
        dense = method.magnitude[:, None] * combined / combined.norm(dim=1, keepdim=True)
        torch.testing.assert_close(net(x), dense_forward(net, x, dense), atol=1e-5, rtol=1e-5)


def test_a_forward_recording_gradients_recomputes_the_norms():
    """A write the version counters miss (`.data`, as some optimisers do) is seen by the next
    training forward, and inference after it no longer uses what was kept before."""
    net, method = attached(ll.AdapterSpec(**SPEC), "linear")
    x = net.sample()
    with torch.inference_mode():
        net(x)  # norms kept, made in inference mode
    method.lora_B.data.mul_(2.0)
    out = net(x)
    torch.testing.assert_close(out, _expected(net, method, x), atol=1e-5, rtol=1e-5)
    out.sum().backward()  # the norms autograd saved are not inference tensors
    assert method.magnitude.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(net(x), _expected(net, method, x), atol=1e-5, rtol=1e-5)
