"""BD-LoRA (arXiv 2510.23346) against ΔW = s·B·A with the block-diagonal factor written out here, and PEFT's
use_bdlora files both ways."""

import pytest
import torch
from method_harness import (
    check_forward,
    check_merge_roundtrip,
    check_param_count,
    check_save_load,
    check_training_lowers_loss,
    randomise_trainables,
)
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import loralab as ll

KINDS = ("linear", "hf-conv1d")
N = 2


def spec(block: str, **options) -> ll.AdapterSpec:
    return ll.AdapterSpec(method="bd-lora", r=4, alpha=8, targets=["layer"],
                          options={"nblocks": N, f"block_{block}": ["layer"], **options})


def diagonal(stacked: torch.Tensor) -> torch.Tensor:
    """The blocks of `stacked` (rows split in N) placed on the diagonal of a zero matrix, by hand."""
    rows, cols = stacked.shape[0] // N, stacked.shape[1]
    dense = torch.zeros(rows * N, cols * N)
    for i in range(N):
        dense[i * rows:(i + 1) * rows, i * cols:(i + 1) * cols] = stacked[i * rows:(i + 1) * rows]
    return dense


def reference(block: str):
    def delta(method, w):
        a, b = method.lora_A.detach(), method.lora_B.detach()
        a, b = (diagonal(a), b) if block == "a" else (a, diagonal(b))
        return 2.0 * b @ a
    return delta


@pytest.mark.parametrize("block", ["a", "b"])
def test_forward_equals_block_diagonal_delta(block):
    check_forward(spec(block), reference(block), kinds=KINDS)


@pytest.mark.parametrize("block", ["a", "b"])
def test_merge_unmerge_restores_weights(block):
    check_merge_roundtrip(spec(block), kinds=KINDS)


def test_param_count_has_one_factor_in_blocks():
    check_param_count(spec("a"), lambda i, o: 4 * i // N + o * 4, kinds=KINDS)
    check_param_count(spec("b"), lambda i, o: 4 * i + o * 4 // N, kinds=KINDS)


@pytest.mark.parametrize("block", ["a", "b"])
def test_save_load_roundtrip(tmp_path, block):
    check_save_load(spec(block), tmp_path, kinds=KINDS)


def test_training_lowers_loss():
    check_training_lowers_loss(spec("b"))


def test_unmatched_layers_are_plain_lora_without_match_strict():
    check_forward(spec("a", block_a=["nothing"], match_strict=False), lambda m, w: 2.0 * m.lora_B @ m.lora_A,
                  kinds=KINDS)


@pytest.mark.parametrize(("options", "message"), [
    ({"block_a": ["layer"], "block_b": ["lay"]}, "matches both block_a and block_b"),
    ({"block_a": ["q_proj"], "match_strict": True}, "matches neither block_a"),
    ({"block_a": ["layer"], "nblocks": 5}, r"needs both sides divisible by nblocks=5"),
    ({"block_a": ["layer"], "nblocks": 0}, "nblocks must be a positive integer"),
])
def test_bad_options_are_refused(options, message):
    from method_harness import Net

    with pytest.raises(ValueError, match=message):
        ll.add_adapter(Net("linear"), ll.AdapterSpec(method="bd-lora", r=4, targets=["layer"], options=options))


PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COLUMN, ROW = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"], ["o_proj", "down_proj"]
IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()



def logits(model):
    return model(input_ids=IDS, use_cache=False).logits


def test_peft_reads_ours(tmp_path):
    bd = ll.AdapterSpec(method="bd-lora", r=4, targets=PROJECTIONS, options={"nblocks": N, "block_a": ROW,
                                                                             "block_b": COLUMN})
    ours = randomise_trainables(ll.add_adapter(llama(), bd))
    ll.save_adapter(ours, tmp_path)
    assert ll.read_config(tmp_path)["use_bdlora"] == {"target_modules_bd_a": ROW, "target_modules_bd_b": COLUMN,
                                                      "nblocks": N, "match_strict": False}
    theirs = PeftModel.from_pretrained(llama(), tmp_path).eval()
    torch.testing.assert_close(logits(theirs), logits(ours), atol=1e-5, rtol=1e-5)


def test_we_read_peft(tmp_path):
    config = LoraConfig(r=4, target_modules=PROJECTIONS, use_bdlora={"target_modules_bd_a": ROW,
                                                                       "target_modules_bd_b": COLUMN, "nblocks": N})
    theirs = randomise_trainables(get_peft_model(llama(), config)).eval()
    theirs.save_pretrained(tmp_path)
    ours = ll.load_adapter(llama(), tmp_path)
    assert ll.get_spec(ours, "default").method == "bd-lora"
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=1e-5)


def test_defaults_split_llama_blocks_as_the_paper_shards_them():
    model = ll.add_adapter(llama(), ll.AdapterSpec(method="bd-lora", r=4, targets="all-linear"))
    layer = model.model.layers[0]
    shapes = {name: (tuple(m.adapters["default"].lora_A.shape), tuple(m.adapters["default"].lora_B.shape))
              for name, m in [("q", layer.self_attn.q_proj), ("o", layer.self_attn.o_proj),
                              ("up", layer.mlp.up_proj), ("down", layer.mlp.down_proj)]}
    assert shapes == {"q": ((4, 16), (16, 2)), "o": ((4, 8), (16, 4)), "up": ((4, 16), (32, 2)),
                      "down": ((4, 16), (16, 4))}


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=4,
                                      bos_token_id=0, eos_token_id=0)).eval()


GPT2_TARGETS, GPT2_A, GPT2_B = ["c_attn", "c_fc", "c_proj"], ["c_attn", "c_fc"], ["c_proj"]


def gpt2_logits(model):
    return model(input_ids=IDS % 64, use_cache=False).logits


def test_gpt2_conv1d_saves_as_loralab_as_peft_cannot_build_it(tmp_path):
    """GPT-2's Conv1D stores W as [in, out]: PEFT's use_bdlora variant fails on it (it reads in_features, which
    Conv1D lacks), so such an adapter is saved in loralab's own format and read back the same."""
    bd = ll.AdapterSpec(method="bd-lora", r=4, targets=GPT2_TARGETS,
                        options={"nblocks": N, "block_a": GPT2_A, "block_b": GPT2_B})
    ours = randomise_trainables(ll.add_adapter(gpt2(), bd))
    ll.save_adapter(ours, tmp_path)
    assert ll.read_config(tmp_path)["peft_type"] == "LORALAB"
    back = ll.load_adapter(gpt2(), tmp_path)
    torch.testing.assert_close(gpt2_logits(back), gpt2_logits(ours), atol=0, rtol=0)
    config = LoraConfig(r=4, target_modules=GPT2_TARGETS, fan_in_fan_out=True,
                        use_bdlora={"target_modules_bd_a": GPT2_A, "target_modules_bd_b": GPT2_B, "nblocks": N})
    with pytest.raises(AttributeError, match="in_features"):  # once PEFT builds it, save it as PEFT's again
        get_peft_model(gpt2(), config)
