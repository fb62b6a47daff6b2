"""TrainConfig(gradient_checkpointing=True) / `loralab train --gradient-checkpointing`: the same
training (losses and adapter weights, dropout included) as keeping every activation, with less
activation memory kept for the backward; a model that cannot do it is refused by name."""

import pytest
import torch
from trainer_toy import adapted_toy, examples, trainable_state
from transformers import LlamaConfig, LlamaForCausalLM

import loralab as ll
from loralab.profiling import saved_tensor_megabytes
from loralab.train.trainer import TrainConfig, Trainer


def tiny_llama(method: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg)
    ll.add_adapter(model, ll.AdapterSpec(method=method, r=4, alpha=8, dropout=0.1, targets="all-linear"))
    return model


def lm_examples(n: int = 32) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": (ids := torch.randint(1, 64, (12,), generator=g).tolist()), "labels": ids}
            for _ in range(n)]


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_training_with_gradient_checkpointing_is_the_same_training(method):
    states, losses = {}, {}
    for on in (False, True):
        model = tiny_llama(method)
        config = TrainConfig(task_kind="causal-lm", lr=1e-2, batch_size=8, max_steps=4, progress=False,
                             log_every=1, schedule="constant", gradient_checkpointing=on)
        trainer = Trainer(model, lm_examples(), None, config)
        assert model.is_gradient_checkpointing == on
        trainer.train()
        states[on], losses[on] = trainable_state(model), [h["loss"] for h in trainer.history]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    for name, value in states[False].items():
        torch.testing.assert_close(states[True][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_gradient_checkpointing_keeps_less_for_the_backward():
    ids = torch.randint(1, 64, (4, 32), generator=torch.Generator().manual_seed(0))
    kept = {}
    for on in (False, True):
        model = tiny_llama("lora").train()
        if on:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        kept[on] = saved_tensor_megabytes(lambda m=model: m(input_ids=ids, labels=ids).loss)
    assert kept[True] < 0.5 * kept[False]


def test_a_model_without_gradient_checkpointing_is_refused_by_name():
    with pytest.raises(ValueError, match="gradient checkpointing needs a transformers model.*Toy does not"):
        Trainer(adapted_toy(), examples(16), None, TrainConfig(gradient_checkpointing=True, progress=False))

