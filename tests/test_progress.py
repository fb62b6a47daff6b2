"""Per-layer work (building an adapter's layers, an init's SVD or QR of every weight) shows a progress bar
once it runs long; here the delay is set to zero so the bar shows at once."""

import pytest
import torch
from torch import nn

import loralab as ll
from loralab import progress


@pytest.mark.parametrize("init", ["pissa", "olora", "gaussian"])
def test_adding_an_adapter_shows_its_per_layer_work(monkeypatch, capsys, init):
    monkeypatch.setattr(progress, "SHOW_AFTER_S", 0.0)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(5)])
    ll.add_adapter(model, ll.AdapterSpec(r=2, targets=[str(i) for i in range(5)], init=init))
    err = capsys.readouterr().err
    assert "lora: layers" in err and "/5 " in err  # every adapted layer counted
    assert (f"{init}:" in err) == (init != "gaussian")  # only the inits that work layer by layer
