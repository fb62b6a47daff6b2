"""torch.compile: the trainer's compiled step learns exactly what the eager one does, and adapted
transformers compile as one graph (a graph break would silently cost most of compile's gain)."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from trainer_toy import adapted_toy, examples, trainable_state
from transformers import LlamaConfig, LlamaForCausalLM

import loralab as ll
from loralab import cli
from loralab.train import TrainConfig, Trainer


def tiny_llama(method: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg)
    ll.add_adapter(model, ll.AdapterSpec(method=method, r=4, alpha=8, targets="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # a live update, so the adapter's path shows in the output
                p.normal_(std=0.1)
    return model


def test_compiled_training_ends_where_eager_training_does():
    config = dict(lr=5e-2, batch_size=16, max_steps=5, progress=False, schedule="constant", log_every=1)
    states, losses = {}, {}
    for compile_ in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model = adapted_toy(dropout=0.0)
        trainer = Trainer(model, examples(128), None, TrainConfig(compile=compile_, **config))
        trainer.train()
        states[compile_] = trainable_state(model)
        losses[compile_] = [h["loss"] for h in trainer.history]
        assert (counters["stats"]["unique_graphs"] > 0) == compile_  # the compiled run really ran compiled
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    for name, value in states[False].items():
        torch.testing.assert_close(states[True][name], value, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_an_adapted_transformer_compiles_as_one_graph_with_the_eager_output_and_gradients(method):
    model = tiny_llama(method)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(input_ids=ids)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    torch._dynamo.reset()
    trained = [p for p in model.parameters() if p.requires_grad]
    eager = model(input_ids=ids, labels=ids)
    eager_grads = torch.autograd.grad(eager.loss, trained)
    compiled = torch.compile(model)(input_ids=ids, labels=ids)
    torch.testing.assert_close(compiled.logits, eager.logits, rtol=1e-4, atol=1e-5)
    for got, want in zip(torch.autograd.grad(compiled.loss, trained), eager_grads):  # the fused backward, traced
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_token_rows_compile_as_one_graph_with_the_eager_output_and_gradient():
    model = tiny_llama("lora")
    model.model.embed_tokens.padding_idx = 0  # a padding token, whose row (if trained) gets no gradient
    ll.add_adapter(model, ll.AdapterSpec(targets=[], trainable_token_indices=[3, 5, 7]), name="rows")
    ll.set_active(model, ["default", "rows"])
    ids = torch.tensor([[3, 1, 5, 9, 7, 3, 2, 8]])
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(input_ids=ids)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    torch._dynamo.reset()
    delta = model.model.embed_tokens.rows["rows"].delta
    losses, grads = [], []
    for run in (model, torch.compile(model)):
        loss = run(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(delta.grad.clone())
        delta.grad = None
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_dora_under_compile_sees_a_merged_base_weight():
    """Compiled DoRA recomputes ‖W‖ in the graph (no data-pointer cache), so a merge that changes W shows."""
    model = tiny_llama("dora")
    ll.add_adapter(model, ll.AdapterSpec(method="lora", r=2, alpha=2, targets="all-linear"), name="other")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and "other" in name:
                p.normal_(std=0.5)
    ll.set_active(model, "default")
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    compiled = torch.compile(model)
    before = compiled(input_ids=ids).logits
    ll.merge(model, "other")
    after = compiled(input_ids=ids).logits
    assert not torch.allclose(after, before, atol=1e-3)
    torch.testing.assert_close(after, model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_train_command_passes_compile_to_the_trainer(monkeypatch, tmp_path):
    seen = {}

    def fake_finetune(base, spec, data, config, out, **kw):
        seen["compile"] = config.compile
        return {"params": "", "after": {}, "adapter": str(tmp_path)}

    monkeypatch.setattr("loralab.train.recipes.finetune", fake_finetune)
    for flags, expected in (([], False), (["--compile"], True)):
        cli.main(["train", "--task", "sst2", "--out", str(tmp_path), *flags])
        assert seen["compile"] is expected
