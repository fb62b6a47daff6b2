"""Trainable token rows (PEFT's TrainableTokens, `trainable_token_indices`).

References: the base model with the rows written into its weight by hand (`W.index_copy`, PEFT's
own definition, tied head included), its gradient for those rows, and PEFT itself, which must read
loralab's files and write files loralab reads, with the same logits."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import loralab as ll
from loralab.model import methods_of
from loralab.serve.pool import unstackable
from loralab.token_rows import TokenRows

TOKENS = [5, 7, 99]
IDS = torch.tensor([[5, 7, 3, 99, 1], [2, 0, 5, 8, 5]])  # 0 is the padding token


def llama(tied: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=tied, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def with_rows(model: nn.Module, rows: torch.Tensor, tokens=TOKENS, head_too: bool = False) -> nn.Module:
    """The reference: a copy of the model whose embedding rows (and head rows) at `tokens` are `rows`."""
    ref = copy.deepcopy(model)
    idx = torch.tensor(tokens)
    with torch.no_grad():
        ref.model.embed_tokens.weight.index_copy_(0, idx, rows)
        if head_too:
            ref.lm_head.weight.index_copy_(0, idx, rows)
    return ref


def new_rows(seed: int = 3, n: int = len(TOKENS)) -> torch.Tensor:
    return torch.randn(n, 16, generator=torch.Generator().manual_seed(seed))


def set_rows(model: nn.Module, rows: torch.Tensor, name: str = "default") -> None:
    with torch.no_grad():
        model.model.embed_tokens.rows[name].delta.copy_(rows)


@pytest.mark.parametrize("tied", [True, False])
def test_output_and_gradient_equal_the_weight_with_the_rows_written_in(tied):
    base = llama(tied)
    ours = ll.add_adapter(copy.deepcopy(base), ll.AdapterSpec(r=2, targets=["q_proj"], trainable_token_indices=TOKENS))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, base(input_ids=IDS).logits)  # starts from the base rows
    rows = new_rows()
    set_rows(ours, rows)
    ref = with_rows(base, rows)  # a tied head shares the weight, so its rows change too
    ref.model.embed_tokens.weight.requires_grad_(True)
    torch.testing.assert_close(ours(input_ids=IDS).logits, ref(input_ids=IDS).logits)
    ours(input_ids=IDS, labels=IDS).loss.backward()
    ref(input_ids=IDS, labels=IDS).loss.backward()
    delta = ours.model.embed_tokens.rows["default"].delta
    torch.testing.assert_close(delta.grad, ref.model.embed_tokens.weight.grad[TOKENS])
    assert isinstance(ours.lm_head, TokenRows) == tied
    assert not ours.model.embed_tokens.base_layer.weight.requires_grad


def test_the_padding_row_gets_no_gradient_as_in_the_base_lookup():
    model = ll.add_adapter(llama(tied=False), ll.AdapterSpec(r=2, targets=["q_proj"], trainable_token_indices=[0, 5]))
    model(input_ids=IDS, labels=IDS).loss.backward()  # IDS holds the padding token 0
    grad = model.model.embed_tokens.rows["default"].delta.grad
    assert grad[0].abs().max() == 0 and grad[1].abs().max() > 0


def test_rows_in_the_dtype_asked_for():
    model = llama().to(torch.bfloat16)
    ll.add_adapter(model, ll.AdapterSpec(r=2, targets=["q_proj"], trainable_token_indices=TOKENS), dtype=torch.float32)
    assert model.model.embed_tokens.rows["default"].delta.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as loralab train --precision bf16 runs it
        assert model(input_ids=IDS).logits.dtype == torch.bfloat16


def test_an_embedding_that_scales_its_output_scales_the_rows_too():
    class Scaled(nn.Embedding):  # as Gemma's embeddings, which multiply by embed_scale
        embed_scale = torch.tensor(3.0)

        def forward(self, ids):
            return super().forward(ids) * self.embed_scale

    net = nn.Sequential(Scaled(20, 8), nn.Linear(8, 3))
    ours = ll.add_adapter(copy.deepcopy(net), ll.AdapterSpec(r=2, targets=["1"], trainable_token_indices=[2, 4]))
    rows, ids = torch.randn(2, 8), torch.tensor([[2, 3, 4]])
    with torch.no_grad():
        ours[0].rows["default"].delta.copy_(rows)
        net[0].weight.index_copy_(0, torch.tensor([2, 4]), rows)
        torch.testing.assert_close(ours[0](ids), net[0](ids))


def test_untied_head_named_in_a_dict_has_rows_of_its_own():
    base = llama(tied=False)
    spec = ll.AdapterSpec(r=2, targets=["q_proj"], trainable_token_indices={"embed_tokens": TOKENS, "lm_head": [1, 5]})
    ours = ll.add_adapter(copy.deepcopy(base), spec)
    emb, head = new_rows(3), new_rows(4, 2)
    set_rows(ours, emb)
    with torch.no_grad():
        ours.lm_head.rows["default"].delta.copy_(head)
        ref = with_rows(base, emb)
        ref.lm_head.weight.index_copy_(0, torch.tensor([1, 5]), head)
        torch.testing.assert_close(ours(input_ids=IDS).logits, ref(input_ids=IDS).logits)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("tokens", [TOKENS, {"embed_tokens": TOKENS}, {"lm_head": TOKENS, "embed_tokens": TOKENS}])
def test_files_are_peft_files_both_ways(tmp_path, tied, tokens):
    theirs = get_peft_model(llama(tied), LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=tokens))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen))
        want = theirs(input_ids=IDS).logits
        assert (want - llama(tied)(input_ids=IDS).logits).abs().max() > 0.1
        theirs.save_pretrained(tmp_path / "peft")
        ours = ll.load_adapter(llama(tied), tmp_path / "peft")
        torch.testing.assert_close(ours(input_ids=IDS).logits, want, atol=1e-5, rtol=1e-5)
        ll.save_adapter(ours, tmp_path / "ours")
        keys = set(ll.read_tensors(tmp_path / "ours"))
        assert keys == set(ll.read_tensors(tmp_path / "peft"))
        assert "model.embed_tokens.token_adapter.trainable_tokens_delta" in keys
        back = PeftModel.from_pretrained(llama(tied), tmp_path / "ours")
        torch.testing.assert_close(back(input_ids=IDS).logits, want, atol=1e-5, rtol=1e-5)


def test_merge_unmerge_and_unload_are_exact():
    base = llama(tied=True)
    ours = ll.add_adapter(copy.deepcopy(base), ll.AdapterSpec(r=2, targets=["q_proj"], trainable_token_indices=TOKENS))
    set_rows(ours, new_rows())
    with torch.no_grad():
        want = ours(input_ids=IDS).logits
        ll.merge(ours)
        torch.testing.assert_close(ours(input_ids=IDS).logits, want)
        ll.unmerge(ours)
        torch.testing.assert_close(ours.model.embed_tokens.base_layer.weight, base.model.embed_tokens.weight,
                                   atol=0, rtol=0)
        plain = ll.merge_and_unload(ours)
        assert type(plain.model.embed_tokens) is nn.Embedding
        assert plain.lm_head.weight is plain.model.embed_tokens.weight
        torch.testing.assert_close(plain(input_ids=IDS).logits, want)


def test_rows_per_batch_row_and_several_adapters():
    base = llama(tied=True)
    model = copy.deepcopy(base)
    ll.add_adapter(model, ll.AdapterSpec(r=2, targets=["q_proj"], trainable_token_indices=TOKENS), "a")
    ll.add_adapter(model, ll.AdapterSpec(r=2, targets=["v_proj"], trainable_token_indices=[3, 8]), "b")
    set_rows(model, new_rows(3), "a")
    set_rows(model, new_rows(4, 2), "b")
    with torch.no_grad():
        alone = {}
        for name in ("a", "b"):
            ll.set_active(model, name)
            alone[name] = model(input_ids=IDS).logits
        with ll.disabled(model):
            alone[None] = model(input_ids=IDS).logits
        for names in (["a", "b"], ["b", None], [None, "a"]):
            mixed = model(input_ids=IDS, adapter_names=names).logits
            for i, name in enumerate(names):
                torch.testing.assert_close(mixed[i], alone[name][i])
        ll.set_active(model, ["a", "b"])  # disjoint rows: both apply (the LoRA factors start at zero)
        ref = with_rows(base, torch.cat([new_rows(3), new_rows(4, 2)]), [*TOKENS, 3, 8])
        torch.testing.assert_close(model(input_ids=IDS).logits, ref(input_ids=IDS).logits)
        torch.testing.assert_close(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)
        ll.merge(model)
        torch.testing.assert_close(model(input_ids=IDS).logits, ref(input_ids=IDS).logits)


def test_remove_and_report():
    model = ll.add_adapter(llama(), ll.AdapterSpec(r=2, targets=["q_proj"], trainable_token_indices=TOKENS))
    q = ll.trainable_parameters(model).trainable
    assert q == 2 * (16 * 2 + 2 * 16) + len(TOKENS) * 16  # two q_proj LoRAs and the rows, counted once (tied)
    ll.remove_adapter(model, "default")
    assert type(model.model.embed_tokens) is nn.Embedding and type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_serving_pool_sends_it_to_the_attached_path():
    spec = ll.AdapterSpec(trainable_token_indices=TOKENS)
    assert any("trainable_token_indices" in why for why in unstackable({}, spec))


@pytest.mark.parametrize("tokens,error", [
    ([5, 100], "has 100 rows"),
    ([5, 5], "more than once"),
    ([], "non-empty list"),
    ({"embed_tokenz": [1]}, "close matches: embed_tokens"),
    ({"input_layernorm": [1]}, "is a LlamaRMSNorm; token rows are trained on an nn.Embedding"),
])
def test_bad_indices_are_refused_clearly(tokens, error):
    with pytest.raises(ValueError, match=error):
        ll.add_adapter(llama(), ll.AdapterSpec(r=2, targets=["v_proj"], trainable_token_indices=tokens))


def test_conflicts_are_refused_before_anything_changes():
    model = llama()
    with pytest.raises(ValueError, match="modules_to_save"):
        ll.add_adapter(model, ll.AdapterSpec(targets=["q_proj"], modules_to_save=["embed_tokens"],
                                             trainable_token_indices=TOKENS))
    with pytest.raises(ValueError, match="adapted by the method"):
        ll.add_adapter(model, ll.AdapterSpec(targets=["embed_tokens", "q_proj"], trainable_token_indices=TOKENS))
    assert type(model.model.embed_tokens) is nn.Embedding and ll.adapter_names(model) == []
    ll.add_adapter(model, ll.AdapterSpec(targets=["q_proj"], trainable_token_indices=TOKENS), "a")
    with pytest.raises(ValueError, match="another adapter's trainable token rows"):
        ll.add_adapter(model, ll.AdapterSpec(targets=["embed_tokens"]), "b")
    ll.add_adapter(model, ll.AdapterSpec(targets=["q_proj"], trainable_token_indices=[7, 8]), "c")
    ll.set_active(model, ["a", "c"])
    with pytest.raises(ValueError, match=r"same tokens \[7\]"):
        model(input_ids=IDS)


def test_plain_module_with_one_embedding():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.out = nn.Embedding(20, 8), nn.Linear(8, 3)

        def forward(self, ids):
            return self.out(self.emb(ids))

    torch.manual_seed(0)
    net = Net()
    ours = ll.add_adapter(copy.deepcopy(net), ll.AdapterSpec(r=2, targets=["out"], trainable_token_indices=[2, 4]))
    rows = torch.randn(2, 8)
    with torch.no_grad():
        ours.emb.rows["default"].delta.copy_(rows)
        ids = torch.tensor([[2, 3, 4]])
        ref_emb = net.emb.weight.index_copy(0, torch.tensor([2, 4]), rows)[ids]
        torch.testing.assert_close(ours.emb(ids), ref_emb)


def test_combine_refuses_token_rows_and_squeeze_keeps_them(tmp_path):
    from loralab.compose import combine
    from loralab.train.rank.lora_squeeze import squeeze_adapter

    model = llama()
    for name in ("a", "b"):
        ll.add_adapter(model, ll.AdapterSpec(r=2, targets=["q_proj"], trainable_token_indices=TOKENS), name)
    with pytest.raises(ValueError, match="also has trainable token rows"):
        combine(model, ["a", "b"])
    ll.set_active(model, "a")
    set_rows(model, new_rows(), "a")
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_B" in pname and ".a." in pname:
                p.normal_()
        want = model(input_ids=IDS).logits
    squeeze_adapter(ll.save_adapter(model, tmp_path / "a", "a"), 2, tmp_path / "squeezed")  # rank 2 to 2: exact
    with torch.no_grad():
        got = ll.load_adapter(llama(), tmp_path / "squeezed")(input_ids=IDS).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_token_rows_alone_are_peft_trainable_tokens_files_both_ways(tmp_path, tied):
    from peft import TrainableTokensConfig

    theirs = get_peft_model(llama(tied), TrainableTokensConfig(token_indices=TOKENS))
    with torch.no_grad():
        theirs.base_model.model.model.embed_tokens.trainable_tokens_delta["default"].copy_(new_rows())
        want = theirs(input_ids=IDS).logits
        theirs.save_pretrained(tmp_path / "peft")
        ours = ll.load_adapter(llama(tied), tmp_path / "peft")
        assert ll.adapter_names(ours) == ["default"] and not list(methods_of(ours, "default"))
        torch.testing.assert_close(ours(input_ids=IDS).logits, want)
        ll.save_adapter(ours, tmp_path / "ours")
        config = ll.read_config(tmp_path / "ours")
        assert config["peft_type"] == "TRAINABLE_TOKENS" and config["token_indices"] == TOKENS
        assert set(ll.read_tensors(tmp_path / "ours")) == set(ll.read_tensors(tmp_path / "peft"))
        back = PeftModel.from_pretrained(llama(tied), tmp_path / "ours")
        torch.testing.assert_close(back(input_ids=IDS).logits, want)


def test_token_rows_alone_in_python():
    base = llama()
    ours = ll.add_adapter(copy.deepcopy(base), ll.AdapterSpec(targets=[], trainable_token_indices=TOKENS))
    assert ll.trainable_parameters(ours).trainable == len(TOKENS) * 16
    set_rows(ours, new_rows())
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, with_rows(base, new_rows())(input_ids=IDS).logits)
    with pytest.raises(ValueError, match="targets=\\[\\] with trainable_token_indices"):
        ll.AdapterSpec(targets=[])


def test_inspect_a_token_rows_only_file(tmp_path, capsys):
    from loralab.cli import main

    ll.save_adapter(ll.add_adapter(llama(), ll.AdapterSpec(targets=[], trainable_token_indices=TOKENS)), tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "method    token rows only (peft_type TRAINABLE_TOKENS)" in out and "rank " not in out
    assert f"tokens    trained rows of {{'model.embed_tokens': {TOKENS}}}" in out


def test_a_tied_head_named_alone_changes_only_its_own_outputs_as_in_peft(tmp_path):
    config = LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices={"lm_head": TOKENS})
    theirs = get_peft_model(llama(), config)
    with torch.no_grad():
        theirs.base_model.model.lm_head.token_adapter.trainable_tokens_delta["default"].copy_(new_rows())
        want = theirs(input_ids=IDS).logits
        theirs.save_pretrained(tmp_path)
        ours = ll.load_adapter(llama(), tmp_path)
        assert type(ours.model.embed_tokens) is nn.Embedding
        torch.testing.assert_close(ours(input_ids=IDS).logits, want)
