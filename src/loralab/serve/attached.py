"""Adapters the pool's stacked LoRA slots cannot hold, attached to the served model instead.

DoRA, VeRA, (IA)³, any loralab method, a LoRAMoE mixture or a MeteoRA router over other
adapters: `attach_unstackable` attaches each such folder under an adapter root to the model
with `loralab.load_adapter` (inactive), under its path relative to the root, as the pool
names its adapters. The engine then serves them through the core per-row path
(`loralab.model.row_adapters`): always resident, mixed in the same batches as the pool's
adapters. A router's experts are attached with it, so they too are served from the model.
Call it before the pool loads its first adapter (the pool puts its slots inside attached layers,
and an adapter cannot be attached around those slots later).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from loralab.checkpoint import CONFIG_FILE, load_adapter, read_config, spec_from_config
from loralab.serve.pool import ACTIVATED, BASE_CHANGING, REPLICATED, WHOLE_BATCH, unstackable
from loralab.spec import AdapterSpec


def attach_unstackable(model: nn.Module, root: str | Path) -> tuple[list[str], dict[str, str]]:
    """Attach every adapter under `root` the pool cannot stack: (attached names, {name: why not})."""
    root = Path(root).resolve()
    folders = {c.parent.relative_to(root).as_posix(): c.parent for c in sorted(root.rglob(CONFIG_FILE))
               if c.parent != root}
    specs: dict[str, AdapterSpec] = {}
    rejected: dict[str, str] = {}
    for name, folder in folders.items():
        try:
            config = read_config(folder)
            spec = spec_from_config(config)
        except (ValueError, KeyError, TypeError):
            continue  # the pool reports it when it tries to register the folder
        reasons = unstackable(config, spec)
        unservable = [why for why in (BASE_CHANGING, WHOLE_BATCH, REPLICATED, ACTIVATED) if why in reasons]
        if unservable:
            rejected[name] = f"cannot be served: it uses {unservable[0]}"
        elif reasons:
            specs[name] = spec
    for name, spec in list(specs.items()):
        experts = spec.options.get("experts", []) if spec.method == "meteora" else []
        missing = [e for e in experts if e not in folders]
        if missing:
            rejected[name] = f"its expert adapters {missing} are not under {root}"
        for expert in set(experts) - set(missing) - set(specs):
            specs[expert] = spec_from_config(read_config(folders[expert]))
    attached = []
    for name in sorted(specs, key=lambda n: specs[n].method == "meteora"):  # experts before their routers
        if name in rejected:
            continue
        try:
            load_adapter(model, folders[name], name, activate=False)
        except Exception as err:  # whatever is wrong with one folder, report it and serve the rest
            rejected[name] = f"cannot be attached: {err}"
            continue
        attached.append(name)
    return attached, rejected
