"""Replicated base blocks sharing their weights, each copy with adapters of its own (PEFT's layer_replication),
checked against PEFT itself both ways, and through generation with a KV cache."""

import pytest
import torch
from method_harness import check_peft_reads, check_reads_peft, randomise_trainables
from peft import LoraConfig
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import loralab as ll
from loralab.compose.merging import combine
from loralab.serve.attached import attach_unstackable

RANGES = [[0, 3], [1, 4]]  # blocks 0 1 2 | 1 2 3
ORDER = [0, 1, 2, 1, 2, 3]
SPEC = dict(method="lora", r=2, alpha=4, targets=["q_proj", "v_proj", "down_proj"], layer_replication=RANGES)


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


class Logits(nn.Module):
    """The model's logits alone (PEFT and loralab find its blocks at .model.model.layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = llama()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, use_cache=False).logits


IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


def test_blocks_are_copies_sharing_weights_with_their_own_adapters():
    model = llama()
    original = model.model.layers
    ll.add_adapter(model, ll.AdapterSpec(**SPEC))
    layers = model.model.layers
    assert len(layers) == 6 and model.config.num_hidden_layers == 6
    assert [block.self_attn.layer_idx for block in layers] == list(range(6))
    for new, old in enumerate(ORDER):
        assert layers[new].mlp.gate_proj.weight is original[old].mlp.gate_proj.weight
        assert layers[new].self_attn.q_proj.base_layer.weight is original[old].self_attn.q_proj.weight
    assert layers[1].self_attn.q_proj.adapters["default"].lora_A is not layers[3].self_attn.q_proj.adapters[
        "default"].lora_A
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.layers.5.mlp.down_proj.adapters.default.lora_B" in names and len(names) == 6 * 3 * 2


def test_peft_reads_ours(tmp_path):
    ours = ll.add_adapter(Logits(), ll.AdapterSpec(**SPEC))
    randomise_trainables(ours)
    check_peft_reads(tmp_path, ours, Logits, IDS)


def test_we_read_peft(tmp_path):
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], layer_replication=RANGES)
    net = check_reads_peft(tmp_path, config, Logits, IDS)
    assert len(net.model.model.layers) == 6


def test_generation_with_a_kv_cache_equals_full_forwards():
    model = ll.add_adapter(llama(), ll.AdapterSpec(**SPEC))
    randomise_trainables(model)
    prompt = IDS[:1]
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    ids = prompt
    for _ in range(6):  # greedy by hand, each step a full forward without a cache
        nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(cached, ids)


def test_removing_the_last_adapter_restores_the_blocks():
    model = llama()
    original = model.model.layers
    ll.add_adapter(model, ll.AdapterSpec(**SPEC), name="a")
    ll.add_adapter(model, ll.AdapterSpec(**SPEC), name="b")
    ll.remove_adapter(model, "a")
    assert len(model.model.layers) == 6
    ll.remove_adapter(model, "b")
    assert model.model.layers is original and model.config.num_hidden_layers == 4


def test_a_failed_add_leaves_the_blocks_alone():
    model = llama()
    with pytest.raises(ValueError, match="q_proj"):
        ll.add_adapter(model, ll.AdapterSpec(**{**SPEC, "targets": ["q_projj"]}))
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4


def test_merge_is_refused():
    model = ll.add_adapter(llama(), ll.AdapterSpec(**SPEC))
    with pytest.raises(ValueError, match="cannot be merged"):
        ll.merge(model)
    with pytest.raises(ValueError, match="cannot be merged"):
        ll.merge_and_unload(model)


def test_every_adapter_holds_the_same_replication():
    model = ll.add_adapter(llama(), ll.AdapterSpec(**SPEC))
    with pytest.raises(ValueError, match=r"the same layer_replication.*\[\[0, 3\], \[1, 4\]\]"):
        ll.add_adapter(model, ll.AdapterSpec(**{**SPEC, "layer_replication": [[0, 4]]}), name="b")
    with pytest.raises(ValueError, match="the same layer_replication"):
        ll.add_adapter(model, ll.AdapterSpec(**{**SPEC, "layer_replication": None}), name="c")
    plain = ll.add_adapter(llama(), ll.AdapterSpec(**{**SPEC, "layer_replication": None}))
    with pytest.raises(ValueError, match="must come with the model's first adapter"):
        ll.add_adapter(plain, ll.AdapterSpec(**SPEC), name="b")


def test_bad_ranges_are_refused():
    with pytest.raises(ValueError, match="does not fit the model's 4 blocks"):
        ll.add_adapter(llama(), ll.AdapterSpec(**{**SPEC, "layer_replication": [[2, 5]]}))
    for bad in ([], [[3, 1]], [[0]], [["0", 2]], [[-1, 2]]):
        with pytest.raises(ValueError, match="layer_replication must be"):
            ll.AdapterSpec(**{**SPEC, "layer_replication": bad})
    with pytest.raises(ValueError, match="list of blocks"):
        ll.add_adapter(nn.Sequential(nn.Linear(4, 4)), ll.AdapterSpec(targets=["0"], layer_replication=[[0, 1]]))


def test_a_format_without_the_field_is_saved_in_loralab_layout(tmp_path):
    model = ll.add_adapter(llama(), ll.AdapterSpec(method="ia3", targets=["q_proj", "down_proj"],
                                                   layer_replication=RANGES))
    ll.save_adapter(model, tmp_path)
    fresh = ll.load_adapter(llama(), tmp_path)
    assert len(fresh.model.layers) == 6
    torch.testing.assert_close(fresh(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_per_block_layer_types_follow_the_copies():
    """Gemma 2 alternates sliding-window and full attention by block: each copy keeps its original's kind."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=8, sliding_window=4, max_position_embeddings=64)
    model = Gemma2ForCausalLM(cfg).eval()
    types = list(cfg.layer_types)
    assert len(set(types)) == 2
    ll.add_adapter(model, ll.AdapterSpec(**SPEC))
    assert model.config.layer_types == [types[i] for i in ORDER]
    randomise_trainables(model)
    prompt = IDS[:1]
    cached = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=True)
    full = model(input_ids=cached[:, :-1], use_cache=False).logits[:, prompt.shape[1] - 1:].argmax(-1)
    assert torch.equal(cached[:, prompt.shape[1]:], full)
    ll.remove_adapter(model, "default")
    assert model.config.layer_types == types


def test_serving_refuses_it_with_the_reason(tmp_path):
    ll.save_adapter(ll.add_adapter(llama(), ll.AdapterSpec(**SPEC)), tmp_path / "deep")
    attached, rejected = attach_unstackable(llama(), tmp_path)
    assert attached == [] and "layer_replication" in rejected["deep"]


def test_combine_refuses_it_by_name(tmp_path):
    model = ll.add_adapter(llama(), ll.AdapterSpec(**SPEC), name="a")
    ll.add_adapter(model, ll.AdapterSpec(**SPEC), name="b")
    with pytest.raises(ValueError, match=r"also has replicated blocks \(layer_replication\)"):
        combine(model, ["a", "b"], weights=[0.5, 0.5])
