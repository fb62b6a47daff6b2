"""Activated LoRA (arXiv 2504.12397; PEFT's alora_invocation_tokens): the update only from the last invocation
on, checked against the base model before it, against PEFT both ways and in cached generation."""

import pytest
import torch
from method_harness import randomise_trainables
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import loralab as ll
from loralab.activated_lora import invocation_offsets
from loralab.serve.attached import attach_unstackable

INVOKE = [7, 8, 9]
TARGETS = ["q_proj", "v_proj", "down_proj"]
SPEC = dict(method="lora", r=2, alpha=4, targets=TARGETS, options={"alora_invocation_tokens": INVOKE})


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()



def batch() -> torch.Tensor:
    """Row 0 invokes at 3 (and at 8, the last, which counts), row 1 never, row 2 at 5."""
    ids = torch.randint(10, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    ids[0, 3:6] = torch.tensor(INVOKE)
    ids[0, 8:11] = torch.tensor(INVOKE)
    ids[2, 5:8] = torch.tensor(INVOKE)
    ids[1, 4:6] = torch.tensor(INVOKE[:2])  # a partial match is none
    return ids


def logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


def test_offsets_count_from_the_last_invocation_to_the_end():
    ids = torch.randint(0, 12, (40, 15), generator=torch.Generator().manual_seed(2))
    want = []
    for row in ids.tolist():
        starts = [i for i in range(len(row) - 2) if row[i:i + 3] == INVOKE]
        want.append(len(row) - starts[-1] if starts else 0)
    ids[0, -3:] = torch.tensor(INVOKE)
    want[0] = 3
    assert invocation_offsets(ids, INVOKE).tolist() == want
    assert invocation_offsets(ids[:, :2], INVOKE).tolist() == [0] * 40


def test_tokens_before_the_invocation_run_as_the_base():
    model = randomise_trainables(ll.add_adapter(llama(), ll.AdapterSpec(**SPEC)))
    ids = batch()
    ours = logits(model, ids)
    with ll.disabled(model):
        base = logits(model, ids)
    torch.testing.assert_close(ours[0, :8], base[0, :8])
    torch.testing.assert_close(ours[1], base[1])
    torch.testing.assert_close(ours[2, :5], base[2, :5])
    assert (ours[0, 8:] - base[0, 8:]).abs().min() > 0 and (ours[2, 5:] - base[2, 5:]).abs().min() > 0


def test_no_gradient_from_tokens_before_the_invocation():
    model = randomise_trainables(ll.add_adapter(llama(), ll.AdapterSpec(**SPEC)))
    logits(model, batch())[:, :5].sum().backward()  # row 2 invokes at 5, row 0 at 8
    assert all(p.grad is not None and p.grad.abs().max() == 0 for p in model.parameters() if p.requires_grad)


def test_peft_reads_ours(tmp_path):
    ours = randomise_trainables(ll.add_adapter(llama(), ll.AdapterSpec(**SPEC)))
    ll.save_adapter(ours, tmp_path)
    assert ll.read_config(tmp_path)["alora_invocation_tokens"] == INVOKE
    theirs = PeftModel.from_pretrained(llama(), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, batch()), logits(ours, batch()), atol=1e-5, rtol=1e-5)


def test_we_read_peft(tmp_path):
    config = LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, alora_invocation_tokens=INVOKE,
                        task_type="CAUSAL_LM")
    theirs = randomise_trainables(get_peft_model(llama(), config)).eval()
    theirs.save_pretrained(tmp_path)
    ours = ll.load_adapter(llama(), tmp_path)
    torch.testing.assert_close(logits(ours, batch()), logits(theirs, batch()), atol=1e-5, rtol=1e-5)


def test_cached_generation_equals_peft_and_full_forwards(tmp_path):
    ours = randomise_trainables(ll.add_adapter(llama(), ll.AdapterSpec(**SPEC)))
    ll.save_adapter(ours, tmp_path)
    theirs = PeftModel.from_pretrained(llama(), tmp_path).eval()
    prompt = batch()
    # no stop at EOS: the full forwards below take all five steps
    kwargs = dict(max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)
    cached = ours.generate(prompt, **kwargs)
    assert torch.equal(cached, theirs.generate(input_ids=prompt, **kwargs))
    ids = prompt
    for _ in range(5):  # greedy by hand: each step a full forward, which finds the invocation again
        ids = torch.cat([ids, logits(ours, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, ids)
    with ll.disabled(ours):
        base = ours.generate(prompt, **kwargs)
    assert torch.equal(cached[1], base[1]) and not torch.equal(cached[0], base[0])  # row 1 never invokes


def test_inputs_embeds_alone_run_as_the_base_with_a_warning():
    model = randomise_trainables(ll.add_adapter(llama(), ll.AdapterSpec(**SPEC)))
    embeds = model.get_input_embeddings()(batch())
    with pytest.warns(UserWarning, match="input_ids"):
        out = model(inputs_embeds=embeds, use_cache=False).logits
    with ll.disabled(model):
        torch.testing.assert_close(out, model(inputs_embeds=embeds, use_cache=False).logits)


def test_removing_it_removes_its_hooks():
    model = ll.add_adapter(llama(), ll.AdapterSpec(**SPEC))
    ll.remove_adapter(model, "default")
    hooks = [*model._forward_pre_hooks.values(), *model._forward_hooks.values()]
    assert [h for h in hooks if getattr(h, "__module__", "") == "loralab.activated_lora"] == []


@pytest.mark.parametrize(("spec", "message"), [
    ({**SPEC, "method": "dora"}, "takes method 'lora' on linear layers"),
    ({**SPEC, "targets": ["embed_tokens"]}, "on a embedding layer"),
    ({**SPEC, "options": {"alora_invocation_tokens": []}}, "non-empty list of token ids"),
    ({**SPEC, "options": {"alora_invocation_tokens": "7 8"}}, "non-empty list of token ids"),
])
def test_bad_settings_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        ll.add_adapter(llama(), ll.AdapterSpec(**spec))


def test_mixed_adapter_rows_equal_each_adapter_alone():
    model = randomise_trainables(ll.add_adapter(llama(), ll.AdapterSpec(**SPEC)))
    randomise_trainables(ll.add_adapter(model, ll.AdapterSpec(method="lora", r=2, targets=TARGETS), name="plain"))
    ids, names = batch(), ["plain", "default", "default"]
    with ll.row_adapters(model, names):
        mixed = logits(model, ids)
    for i, name in enumerate(names):
        ll.set_active(model, name)
        torch.testing.assert_close(mixed[i], logits(model, ids[i:i + 1])[0], atol=1e-5, rtol=1e-5)
    kwargs = dict(max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
    with ll.row_adapters(model, names):
        generated = model.generate(ids, **kwargs)
    for i, name in enumerate(names):
        ll.set_active(model, name)
        assert torch.equal(generated[i], model.generate(ids[i:i + 1], **kwargs)[0])


def test_merge_and_serving_are_refused(tmp_path):
    model = ll.add_adapter(llama(), ll.AdapterSpec(**SPEC))
    with pytest.raises(RuntimeError, match="cannot be merged"):
        ll.merge(model)
    assert logits(model, batch()).isfinite().all()  # nothing was changed by the refused merge
    ll.save_adapter(model, tmp_path / "activated", name="default")
    attached, rejected = attach_unstackable(llama(), tmp_path)
    assert attached == [] and "activated LoRA" in rejected["activated"]


def test_gradient_checkpointing_gives_the_same_gradients():
    """Recomputed blocks (in the backward, after the model's forward) still see where each row invokes."""
    grads = {}
    for on in (False, True):
        model = randomise_trainables(ll.add_adapter(llama(), ll.AdapterSpec(**SPEC))).train()
        if on:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids = batch()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads[on] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads[True].keys() == grads[False].keys() and any(g.abs().max() > 0 for g in grads[False].values())
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, msg=name)
