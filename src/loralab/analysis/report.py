"""`loralab analyze`: per-layer norms, effective ranks and spectra of an adapter's ΔW, intruder
dimensions against the base weights (with --base), subspace similarity to another adapter
(with --other); PNG plots and one self-contained HTML report (images embedded)."""

from __future__ import annotations

import base64
import html
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from loralab.analysis.measures import effective_rank, factor_singular_values, intruder_dimensions, subspace_similarity
from loralab.checkpoint import atomic_write, read_config, read_tensors, spec_from_config
from loralab.inspect_adapter import RANK_DIAGONALS, gated_b
from loralab.peft_lora_fields import check_file_alone


@dataclass
class LayerStats:
    module: str
    frobenius: float
    spectral: float
    effective_rank: float
    singular_values: list[float]
    intruders: int | None = None
    similarity: list[list[float]] | None = None


@dataclass
class Analysis:
    adapter: str
    method: str
    layers: list[LayerStats] = field(default_factory=list)


def short(module: str) -> str:
    """"model.layers.12.self_attn.q_proj" → "12.self_attn.q_proj": from the layer index on."""
    parts = module.split(".")
    numbered = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[numbered[-1]:]) if numbered else module


def lora_factors(path: str | os.PathLike) -> tuple[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
    config = read_config(path)
    check_file_alone(config, "analyze")
    spec = spec_from_config(config)
    tensors = read_tensors(path)
    found = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            b = tensors[f"{module}.lora_B.weight"]
            own = {k: tensors[f"{module}.{k}"] for k in RANK_DIAGONALS if f"{module}.{k}" in tensors}
            found[module] = (a.reshape(a.shape[0], -1).float(), gated_b(b.reshape(b.shape[0], -1).float(), own),
                             spec.for_layer(module).scale)
    if not found:
        raise ValueError(f"{path} holds no LoRA factors to analyse (analysis reads LoRA-family adapters)")
    return spec.method, found


def measure(adapter: str | os.PathLike, base_weights: dict[str, torch.Tensor] | None = None,
            other: str | os.PathLike | None = None) -> Analysis:
    method, factors = lora_factors(adapter)
    other_factors = lora_factors(other)[1] if other is not None else None
    if other_factors is not None and not set(factors) & set(other_factors):
        raise ValueError(f"{adapter} and {other} have no adapted layer in common")
    result = Analysis(str(adapter), method)
    for module, (a, b, s) in tqdm(sorted(factors.items()), desc="analyse", disable=len(factors) < 20, leave=False):
        sv = factor_singular_values(a, b, s)
        stats = LayerStats(module, float(sv.norm()), float(sv.max()), effective_rank(sv), sv.tolist())
        if base_weights is not None and module in base_weights:
            w = base_weights[module].double()
            delta = s * b.double() @ a.double()
            if w.shape != delta.shape:
                raise ValueError(f"base weight of {module} is {list(w.shape)} but the adapter's ΔW is "
                                 f"{list(delta.shape)}: a different base model")
            stats.intruders = intruder_dimensions(w, w + delta)
        if other_factors is not None and module in other_factors:
            stats.similarity = subspace_similarity(a, other_factors[module][0]).tolist()
        result.layers.append(stats)
    return result


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def plots(analysis: Analysis) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [short(layer.module) for layer in analysis.layers]
    out = {}
    for key, title, values in (("norms", "‖ΔW‖_F per layer", [la.frobenius for la in analysis.layers]),
                               ("effective_rank", "effective rank of ΔW per layer",
                                [la.effective_rank for la in analysis.layers])):
        fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.18), 3.5))
        ax.bar(range(len(names)), values)
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        ax.set_title(title)
        ax.set_xlabel("layer")
        out[key] = _png(fig)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for layer in analysis.layers:
        sv = torch.tensor(layer.singular_values)
        ax.plot(range(1, len(sv) + 1), (sv / sv.max().clamp_min(1e-12)).tolist(), alpha=0.4)
    ax.set_title("normalised singular values of ΔW (one line per layer)")
    ax.set_xlabel("index")
    ax.set_ylabel("σ_i / σ_1")
    out["spectra"] = _png(fig)
    plt.close(fig)
    if any(layer.intruders is not None for layer in analysis.layers):
        fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.18), 3.5))
        ax.bar(range(len(names)), [layer.intruders or 0 for layer in analysis.layers], color="tab:red")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        ax.set_title("intruder dimensions (top-10 singular vectors of W + ΔW with max cos < 0.5 to W's)")
        out["intruders"] = _png(fig)
        plt.close(fig)
    compared = [layer for layer in analysis.layers if layer.similarity is not None]
    if compared:
        shown = compared[:: max(1, len(compared) // 4)][:4]
        fig, axes = plt.subplots(1, len(shown), figsize=(3.6 * len(shown), 3.2), squeeze=False)
        fig.subplots_adjust(wspace=0.45)
        for ax, layer in zip(axes[0], shown):
            rows, cols = len(layer.similarity), len(layer.similarity[0])
            im = ax.imshow(layer.similarity, vmin=0, vmax=1, cmap="viridis", origin="lower",
                           extent=(0.5, cols + 0.5, 0.5, rows + 0.5))
            ax.set_title(short(layer.module), fontsize=8)
            ax.set_xlabel("j (other)")
            ax.set_ylabel("i (this)")
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="φ(i, j)")
        fig.suptitle("subspace similarity of A's right singular vectors (LoRA paper §7.2)")
        out["similarity"] = _png(fig)
        plt.close(fig)
    return out


def analyze(adapter: str | os.PathLike, out_dir: str | os.PathLike, base: str | None = None,
            other: str | os.PathLike | None = None) -> Path:
    """Write the PNGs and report.html into out_dir; returns the report's path."""
    weights = None
    if base is not None:
        from loralab.layer_kinds import kind_of
        from loralab.loading import task_of_adapter
        from loralab.zoo.models import load_base

        task, num_labels = task_of_adapter(adapter)  # the same model class, so module names match
        model, _ = load_base(base, task=task, num_labels=num_labels)
        weights = {n: kind.matrix().detach() for n, m in model.named_modules() if (kind := kind_of(m)) is not None}
    analysis = measure(adapter, weights, other)
    images = plots(analysis)
    out = Path(out_dir)
    for key, data in images.items():
        atomic_write(out / f"{key}.png", lambda tmp, d=data: Path(tmp).write_bytes(d))
    rows = "".join(
        f"<tr><td>{html.escape(la.module)}</td><td>{la.frobenius:.4g}</td><td>{la.spectral:.4g}</td>"
        f"<td>{la.effective_rank:.2f}</td><td>{'' if la.intruders is None else la.intruders}</td></tr>"
        for la in analysis.layers)
    figures = "".join(f'<h2>{key.replace("_", " ")}</h2><img src="data:image/png;base64,'
                      f'{base64.b64encode(data).decode()}">' for key, data in images.items())
    page = (f"<!doctype html><meta charset='utf-8'><title>loralab analysis</title>"
            f"<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 8px;text-align:right}}"
            f"img{{max-width:100%}}</style><h1>Adapter analysis: {html.escape(analysis.adapter)}</h1>"
            f"<p>method {analysis.method}; {len(analysis.layers)} layers"
            f"{'; compared with ' + html.escape(str(other)) if other else ''}</p>{figures}"
            f"<h2>per layer</h2><table><tr><th>module</th><th>‖ΔW‖_F</th><th>‖ΔW‖₂</th><th>effective rank</th>"
            f"<th>intruders</th></tr>{rows}</table>")
    report = out / "report.html"
    atomic_write(report, lambda tmp: Path(tmp).write_text(page))
    return report
