"""Adapters on scaled word embeddings (transformers' Gemma 3 and BART embeddings multiply every looked-up row
by `embed_scale`): the update's rows are scaled as the base's are, as PEFT computes them and as merging does."""

import pytest
import torch
from method_harness import check_peft_reads, check_reads_peft, randomise_trainables
from peft import LoraConfig
from torch import nn
from transformers.models.bart.modeling_bart import BartScaledWordEmbedding
from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

import loralab as ll

EMBEDDINGS = {
    "gemma3": lambda: Gemma3TextScaledWordEmbedding(30, 8, padding_idx=0, embed_scale=8 ** 0.5),  # a buffer
    "bart": lambda: BartScaledWordEmbedding(30, 8, padding_idx=1, embed_scale=3.0),  # a float
}


class Tiny(nn.Module):
    def __init__(self, which: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = EMBEDDINGS[which]()
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


IDS = torch.randint(0, 30, (3, 6), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("which", sorted(EMBEDDINGS))
def test_update_rows_are_scaled_like_the_base(which):
    net = ll.add_adapter(Tiny(which), ll.AdapterSpec(method="lora", r=2, alpha=4, targets=["embed"]))
    randomise_trainables(net)
    layer = net.embed
    a, b = layer.adapters["default"].lora_A, layer.adapters["default"].lora_B
    table = layer.base_layer.weight + (2.0 * b @ a).T  # W + s·BA in the table's [num, dim] layout
    scale = float(layer.base_layer.embed_scale)
    torch.testing.assert_close(net(IDS), net.head(table[IDS] * scale))
    unmerged = net(IDS)
    ll.merge(net)
    torch.testing.assert_close(net(IDS), unmerged)


@pytest.mark.parametrize("which", sorted(EMBEDDINGS))
def test_peft_reads_ours(tmp_path, which):
    net = ll.add_adapter(Tiny(which), ll.AdapterSpec(method="lora", r=2, alpha=4, targets=["embed"]))
    randomise_trainables(net)
    check_peft_reads(tmp_path, net, lambda: Tiny(which), IDS)


@pytest.mark.parametrize("which", sorted(EMBEDDINGS))
def test_we_read_peft(tmp_path, which):
    check_reads_peft(tmp_path, LoraConfig(r=2, lora_alpha=4, target_modules=["embed"]), lambda: Tiny(which), IDS)


def test_token_rows_are_scaled_too():
    net = ll.add_adapter(Tiny("gemma3"), ll.AdapterSpec(method="lora", r=2, targets=[],
                                                         trainable_token_indices={"embed": [3, 4]}))
    with torch.no_grad():
        rows = next(p for n, p in net.named_parameters() if p.requires_grad)
        rows.normal_()
    ids = torch.tensor([[3, 5, 4]])
    out = net.embed(ids)
    torch.testing.assert_close(out[0, 0], rows[0] * 8 ** 0.5)
    torch.testing.assert_close(out[0, 1], net.embed.base_layer(torch.tensor([5]))[0])


def test_a_scale_that_is_not_one_number_is_refused():
    net = Tiny("bart")
    net.embed.embed_scale = torch.ones(8)
    with pytest.raises(ValueError, match=r"embed_scale to be one number.*\(8,\)"):
        ll.add_adapter(net, ll.AdapterSpec(method="lora", r=2, targets=["embed"]))
