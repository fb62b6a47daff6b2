"""Merging adapters: each method against a direct computation on dense ΔW written here, the
folder path against the live one, PEFT reading the result, and every refused input."""

import json
import math

import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import loralab as ll
from loralab.compose import combine, combine_folders
from loralab.model import methods_of


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(12, 10)  # rank ≤ 10 fits every layer: dense merges can be exact
        self.down = nn.Linear(10, 12)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def fill(model, name, seed, b_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in methods_of(model, name):
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g))
            m.lora_B.copy_(b_scale * torch.randn(m.lora_B.shape, generator=g))


def toy(ranks=(2, 3)):
    torch.manual_seed(0)
    model = Toy()
    for i, r in enumerate(ranks):
        ll.add_adapter(model, ll.AdapterSpec(r=r, alpha=2 * r + 1, targets=["up", "down"]), name=f"t{i}")
        fill(model, f"t{i}", seed=10 + i)
    return model


def dense(model, name):
    return {p: (m.scale * m.lora_B @ m.lora_A).detach() for p, m in methods_of(model, name)}


def weighted_sum(model, names, weights):
    parts = [dense(model, n) for n in names]
    return {p: sum(w * part[p] for w, part in zip(weights, parts)) for p in parts[0]}


def best_rank(delta, k):
    u, s, vh = torch.linalg.svd(delta)
    return u[:, :k] @ torch.diag(s[:k]) @ vh[:k]


def top(delta, density):
    k = round(density * delta.numel())
    threshold = delta.abs().flatten().sort(descending=True).values[k - 1]
    return delta * (delta.abs() >= threshold)


def ties_of(values):
    """TIES for one entry: the sign of the sum wins, the non-zero values of that sign are averaged."""
    sign = math.copysign(1.0, sum(values)) if sum(values) != 0 else 0.0
    agreeing = [v for v in values if v != 0 and math.copysign(1.0, v) == sign]
    return sum(agreeing) / len(agreeing) if agreeing else 0.0


def ties_reference(deltas, density):
    trimmed = [top(d, density) for d in deltas]
    out = torch.zeros_like(deltas[0])
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = ties_of([float(t[i, j]) for t in trimmed])
    return out


def close(got, want):
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# ---- each method against its definition --------------------------------------------------------
@pytest.mark.parametrize("method", ["linear", "cat"])
def test_linear_and_cat_are_the_exact_weighted_sum(method):
    model = toy()
    combine(model, ["t0", "t1"], method=method, weights=[0.7, -0.3], name="m")
    want = weighted_sum(model, ["t0", "t1"], [0.7, -0.3])
    for p, got in dense(model, "m").items():
        close(got, want[p])
    assert ll.get_spec(model, "m").r == 5  # ranks 2 + 3 concatenate
    assert ll.active_adapters(model) == ["m"]


def test_svd_is_the_best_rank_k_approximation_of_the_sum():
    model = toy()
    combine(model, ["t0", "t1"], method="svd", rank=2, weights=[1.0, 0.5], name="m")
    combine(model, ["t0", "t1"], method="svd", weights=[1.0, 0.5], name="default_rank")
    want = weighted_sum(model, ["t0", "t1"], [1.0, 0.5])
    for p, got in dense(model, "m").items():
        close(got, best_rank(want[p], 2))
        close(dense(model, "default_rank")[p], best_rank(want[p], 3))  # default: the largest r_i
    assert ll.get_spec(model, "m").r == 2


def test_ties_trims_elects_signs_and_takes_the_disjoint_mean():
    model = toy()
    combine(model, ["t0", "t1"], method="ties", density=0.4, weights=[1.0, -0.8], rank=10, name="exact")
    combine(model, ["t0", "t1"], method="ties", density=0.4, weights=[1.0, -0.8], name="default_rank")
    parts = [dense(model, "t0"), dense(model, "t1")]
    for p, got in dense(model, "exact").items():
        want = ties_reference([parts[0][p], -0.8 * parts[1][p]], 0.4)
        close(got, want)
        close(dense(model, "default_rank")[p], best_rank(want, 5))  # default: Σ r_i = 5
    assert ll.get_spec(model, "default_rank").r == 5


def test_magnitude_prune_keeps_the_largest_entries_of_the_sum():
    model = toy()
    combine(model, ["t0", "t1"], method="magnitude-prune", density=0.3, rank=10, name="m")
    want = weighted_sum(model, ["t0", "t1"], [1.0, 1.0])
    for p, got in dense(model, "m").items():
        close(got, top(want[p], 0.3))


def recover(got, candidates):
    """Per entry, the index of the candidate value it equals (asserting that it equals one)."""
    stack = torch.stack(candidates)
    gap, which = (stack - got).abs().min(0)
    assert gap.max() < 1e-4 * (1 + got.abs().max())
    return which


def test_dare_drops_at_random_and_rescales_by_one_over_density():
    model = toy()
    combine(model, ["t0", "t1"], method="dare", density=0.5, rank=10, seed=1, name="d")
    parts = [dense(model, "t0"), dense(model, "t1")]
    kept = [[], []]
    for p, got in dense(model, "d").items():
        x0, x1 = parts[0][p] / 0.5, parts[1][p] / 0.5
        which = recover(got, [torch.zeros_like(x0), x0, x1, x0 + x1])  # dropped, only t0, only t1, both
        kept[0].append(((which == 1) | (which == 3)).float().flatten())
        kept[1].append(((which == 2) | (which == 3)).float().flatten())
    for k in kept:
        assert abs(torch.cat(k).mean().item() - 0.5) < 0.12  # 240 draws per adapter, keep probability 0.5
    combine(model, ["t0", "t1"], method="dare", density=0.5, rank=10, seed=1, name="again")
    combine(model, ["t0", "t1"], method="dare", density=0.5, rank=10, seed=2, name="other_seed")
    for p in parts[0]:
        torch.testing.assert_close(dense(model, "again")[p], dense(model, "d")[p])
        assert not torch.allclose(dense(model, "other_seed")[p], dense(model, "d")[p])
    for n in ("t0", "t1"):  # the same factors on `up` alone: a layer's drops do not depend on the other layers
        ll.add_adapter(model, ll.AdapterSpec(r=ll.get_spec(model, n).r, alpha=ll.get_spec(model, n).alpha,
                                             targets=["up"]), name=f"{n}_up")
        with torch.no_grad():
            dict(methods_of(model, f"{n}_up"))["up"].load_state_dict(dict(methods_of(model, n))["up"].state_dict())
    combine(model, ["t0_up", "t1_up"], method="dare", density=0.5, rank=10, seed=1, name="up_alone")
    torch.testing.assert_close(dense(model, "up_alone")["up"], dense(model, "d")["up"])
    combine(model, ["t0", "t1"], method="dare", density=1.0, rank=10, name="keep_all")
    want = weighted_sum(model, ["t0", "t1"], [1.0, 1.0])
    for p, got in dense(model, "keep_all").items():
        close(got, want[p])


def test_dare_ties_elects_signs_among_the_surviving_entries():
    model = toy()
    combine(model, ["t0", "t1"], method="dare-ties", density=0.6, rank=10, seed=4, name="m")
    parts = [dense(model, "t0"), dense(model, "t1")]
    for p, got in dense(model, "m").items():
        x0, x1 = parts[0][p] / 0.6, parts[1][p] / 0.6
        both = torch.tensor([[ties_of([float(u), float(v)]) for u, v in zip(r0, r1)] for r0, r1 in zip(x0, x1)])
        which = recover(got, [torch.zeros_like(x0), x0, x1, both])
        assert (which == 3).any() and (which == 0).any()


def balanced(b, a):
    """A rank-one unit b aᵀ written as [b; a] with ‖b‖ = ‖a‖ and a's largest entry positive."""
    root = (b.norm() * a.norm()).sqrt()
    b, a = b * root / b.norm(), a * root / a.norm()
    sign = 1.0 if a[a.abs().argmax()] > 0 else -1.0
    return sign * b, sign * a


def lego_reference(clusters, mean_rank):
    """Σ over clusters of the centroid unit, rescaled to its members' mean norm; times √(r̄ / k)."""
    total = 0
    for members in clusters:
        units = [torch.cat(balanced(b, a)) for b, a in members]
        centre = torch.stack(units).mean(0)
        centre = centre * torch.stack(units).norm(dim=1).mean() / centre.norm()
        total = total + torch.outer(centre[:10], centre[10:])
    return math.sqrt(mean_rank / len(clusters)) * total


def set_units(model, name, units):
    """Adapter `name` on `up` [10, 12] holds exactly the rank-one units b aᵀ given (scale 1)."""
    m = dict(methods_of(model, name))["up"]
    with torch.no_grad():
        m.lora_B.copy_(torch.stack([b for b, _ in units], 1))
        m.lora_A.copy_(torch.stack([a for _, a in units]))


def test_lora_lego_clusters_shared_units_into_centroids():
    g = torch.Generator().manual_seed(5)
    u = [(3 * torch.randn(10, generator=g), torch.randn(12, generator=g)) for _ in range(4)]
    # u0, u1 perturbed, written with the other sign (b aᵀ = (−b)(−aᵀ)): still the same two clusters
    near = [(-b - 0.4 * torch.randn(10, generator=g), -0.9 * a - 0.3 * torch.randn(12, generator=g)) for b, a in u[:2]]

    model = Toy()  # two adapters of rank 2 holding nearly the same two units: clusters {u0, u0'}, {u1, u1'}
    for name, units in [("t0", u[:2]), ("t1", near)]:
        ll.add_adapter(model, ll.AdapterSpec(r=2, alpha=2, targets=["up"]), name=name)
        set_units(model, name, units)
    combine(model, ["t0", "t1"], method="lora-lego", rank=2, name="m")
    want = lego_reference([[u[0], near[0]], [u[1], near[1]]], mean_rank=2)
    close(dense(model, "m")["up"], want)

    model = Toy()  # ranks 2 and 3 sharing u0: k = 4 clusters {u0, u0}, {u1}, {u2}, {u3}; r̄ = 2.5
    for name, units in [("t0", u[:2]), ("t1", [u[0], u[2], u[3]])]:
        ll.add_adapter(model, ll.AdapterSpec(r=len(units), alpha=len(units), targets=["up"]), name=name)
        set_units(model, name, units)
    combine(model, ["t0", "t1"], method="lora-lego", rank=4, name="m")
    close(dense(model, "m")["up"], lego_reference([[u[0], u[0]], [u[1]], [u[2]], [u[3]]], mean_rank=2.5))


def test_lora_family_adapters_merge_through_their_own_factors():
    model = toy()
    ll.add_adapter(model, ll.AdapterSpec(method="sora", r=3, alpha=6, targets=["up", "down"]), name="s")
    fill(model, "s", seed=3)
    gates = torch.tensor([1.0, 0.0, -0.5])
    with torch.no_grad():
        for _, m in methods_of(model, "s"):
            m.lora_gate.copy_(gates)
    combine(model, ["s", "t0"], method="linear", name="m")
    want = {p: 2.0 * m.lora_B @ torch.diag(gates) @ m.lora_A for p, m in methods_of(model, "s")}
    for p, got in dense(model, "m").items():
        close(got, want[p].detach() + dense(model, "t0")[p])


# ---- folders, bases, PEFT ----------------------------------------------------------------------
def folder_delta(path):
    cfg, tensors = ll.read_config(path), ll.read_tensors(path)
    scale = cfg["lora_alpha"] / cfg["r"]
    return {k.removesuffix(".lora_A.weight"): scale * tensors[k.replace("lora_A", "lora_B")] @ t
            for k, t in tensors.items() if k.endswith(".lora_A.weight")}


def saved(model, tmp_path, names):
    return [ll.save_adapter(model, tmp_path / n, name=n) for n in names]


@pytest.mark.parametrize("method", ["dare", "lora-lego"])
def test_folders_merge_without_a_model_as_the_live_merge_does(tmp_path, method):
    model = toy()
    dirs = saved(model, tmp_path, ["t0", "t1"])
    out = combine_folders(dirs, tmp_path / "m", method=method, weights=[1.0, 0.5], seed=7, rank=3)
    combine(model, ["t0", "t1"], method=method, weights=[1.0, 0.5], seed=7, rank=3, name="m")
    got = folder_delta(out)
    assert set(got) == {"up", "down"}
    for p, want in dense(model, "m").items():
        close(got[p], want)


def test_folders_with_per_layer_ranks_and_scales_merge_to_the_weighted_sum(tmp_path):
    """rank_pattern / alpha_pattern: each layer's ΔW = its own scale · B A (dense reference written here)."""
    model = toy()
    ll.add_adapter(model, ll.AdapterSpec(r=2, alpha=4, targets=["up", "down"], rank_pattern={"down": 5},
                                         alpha_pattern={"up": 1.0}), name="p")
    fill(model, "p", seed=20)
    dirs = saved(model, tmp_path, ["t0", "p"])
    got = folder_delta(combine_folders(dirs, tmp_path / "m", method="linear", weights=[1.0, 0.5]))
    for path, want in weighted_sum(model, ["t0", "p"], [1.0, 0.5]).items():
        close(got[path], want)


def test_base_model_path_gives_the_same_adapter_and_is_left_clean(tmp_path):
    model = toy()
    ll.add_adapter(model, ll.AdapterSpec(method="sora", r=3, alpha=6, targets=["up", "down"]), name="s")
    fill(model, "s", seed=3)
    dirs = saved(model, tmp_path, ["t0", "t1", "s"])
    plain = combine_folders(dirs[:2], tmp_path / "plain", method="svd", rank=3)
    base = Toy()
    through = combine_folders(dirs[:2], tmp_path / "through", method="svd", rank=3, base=base)
    for p, want in folder_delta(plain).items():
        close(folder_delta(through)[p], want)
    assert ll.adapter_names(base) == []
    with pytest.raises(ValueError, match="sora adapter.*base="):
        combine_folders([dirs[2]], tmp_path / "s_alone")
    combine_folders([dirs[2], dirs[0]], tmp_path / "s_through", base=base)
    want = weighted_sum(model, ["t0"], [1.0])
    for p, m in methods_of(model, "s"):
        close(folder_delta(tmp_path / "s_through")[p], m.delta_weight().detach() + want[p])


def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def test_peft_loads_combined_adapters_with_the_same_logits(tmp_path):
    model = llama()
    for i, r in enumerate((2, 3)):
        ll.add_adapter(model, ll.AdapterSpec(r=r, alpha=2 * r, targets=["q_proj", "v_proj"]), name=f"t{i}")
        fill(model, f"t{i}", seed=10 + i, b_scale=0.1)
    combine(model, ["t0", "t1"], method="ties", density=0.5, name="live")
    ll.save_adapter(model, tmp_path / "live", name="live")
    dirs = saved(model, tmp_path, ["t0", "t1"])
    combine_folders(dirs, tmp_path / "files", method="linear", weights=[1.0, 0.5])
    want = weighted_sum(model, ["t0", "t1"], [1.0, 0.5])
    for p, got in folder_delta(tmp_path / "files").items():
        close(got, want[p])
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    for folder, ours in [("live", model), ("files", ll.load_adapter(llama(), tmp_path / "files"))]:
        theirs = PeftModel.from_pretrained(llama(), tmp_path / folder).eval()
        with torch.no_grad():
            ours_logits, theirs_logits = ours(ids).logits, theirs(ids).logits
            with ll.disabled(ours):
                assert not torch.allclose(ours(ids).logits, ours_logits, atol=1e-4)  # the adapter does something
        torch.testing.assert_close(theirs_logits, ours_logits, atol=1e-5, rtol=1e-4)


# ---- refused inputs ----------------------------------------------------------------------------
def test_arguments_out_of_range_are_refused():
    model = toy()
    cases = [
        (dict(names=[]), "at least one adapter"),
        (dict(weights=[1.0]), "1 weights for 2 adapters"),
        (dict(method="ties", density=0.0), r"density must be in \(0, 1\]"),
        (dict(method="dare", density=1.5), r"density must be in \(0, 1\]"),
        (dict(method="svd", rank=6), "at most 5 .the sum of the adapters' ranks"),
        (dict(method="lora-lego", rank=6), "at most 5"),
        (dict(method="ties", rank=11), r"exceeds what layer \w+ \[\d+, \d+\] allows \(10\)"),
        (dict(method="linear", rank=3), "takes no rank"),
        (dict(method="tie"), "unknown merge method 'tie'; did you mean: ties"),
        (dict(method="lego"), "did you mean: .*lora-lego"),
        (dict(names=["t0", "t9"]), "unknown adapter 't9'"),
    ]
    for kwargs, message in cases:
        kwargs = {"names": ["t0", "t1"], **kwargs}
        with pytest.raises(ValueError, match=message):
            combine(model, kwargs.pop("names"), name="m", **kwargs)
    assert "m" not in ll.adapter_names(model)


def test_exact_merges_that_do_not_fit_a_layer_are_refused():
    model = toy(ranks=(6, 6))
    with pytest.raises(ValueError, match=r"rank Σ r_i = 12, more than layer \w+ \[\d+, \d+\] allows \(10\)"):
        combine(model, ["t0", "t1"], method="cat")


def test_non_lora_adapters_are_refused(tmp_path):
    model = toy()
    ll.add_adapter(model, ll.AdapterSpec(method="dora", r=2, targets=["up", "down"]), name="d")
    with pytest.raises(ValueError, match="d is a dora adapter; combine merges LoRA-family adapters .*lora"):
        combine(model, ["t0", "d"])
    with pytest.raises(ValueError, match="dora adapter"):
        combine_folders(saved(model, tmp_path, ["d", "t0"]), tmp_path / "m")


def test_different_layers_need_allow_partial(tmp_path):
    model = toy()
    ll.add_adapter(model, ll.AdapterSpec(r=2, targets=["up"]), name="up_only")
    fill(model, "up_only", seed=4)
    with pytest.raises(ValueError, match="up_only lacks down.*allow_partial=True"):
        combine(model, ["t0", "up_only"])
    dirs = saved(model, tmp_path, ["t0", "up_only"])
    with pytest.raises(ValueError, match="up_only lacks down"):
        combine_folders(dirs, tmp_path / "m")
    combine(model, ["t0", "up_only"], allow_partial=True, name="m")
    out = combine_folders(dirs, tmp_path / "m", allow_partial=True)
    close(dense(model, "m")["up"], dense(model, "t0")["up"] + dense(model, "up_only")["up"])
    close(dense(model, "m")["down"], dense(model, "t0")["down"])  # the missing layer counts as ΔW = 0
    for p, got in folder_delta(out).items():
        close(got, dense(model, "m")[p])


def test_adapters_of_different_bases_are_refused_by_name(tmp_path):
    model = toy()
    dirs = saved(model, tmp_path, ["t0", "t1"])
    for d, base in zip(dirs, ["org/model-a", "org/model-b"]):
        cfg = ll.read_config(d)
        cfg["base_model_name_or_path"] = base
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"different base models \(.*t0 on org/model-a; .*t1 on org/model-b\)"):
        combine_folders(dirs, tmp_path / "m")
    other = nn.Module()
    other.up, other.down = nn.Linear(14, 10), nn.Linear(10, 12)
    ll.add_adapter(other, ll.AdapterSpec(r=2, targets=["up", "down"]), name="wide")
    with pytest.raises(ValueError, match=r"layer up has different shapes \(\[10, 12\] in .*t0; \[10, 14\] in .*wide"):
        combine_folders([dirs[0], ll.save_adapter(other, tmp_path / "wide", name="wide")], tmp_path / "m")


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv2d(3, 6, 3)
        self.lin = nn.Linear(8, 5)


def test_folders_keep_embedding_and_conv_layouts(tmp_path):
    torch.manual_seed(0)
    model = Mixed()
    for i, r in enumerate((2, 3)):
        ll.add_adapter(model, ll.AdapterSpec(r=r, alpha=r, targets=["emb", "conv", "lin"]), name=f"t{i}")
        fill(model, f"t{i}", seed=i)
    out = combine_folders(saved(model, tmp_path, ["t0", "t1"]), tmp_path / "m", method="cat", weights=[1.0, -2.0])
    loaded = ll.load_adapter(Mixed(), out)
    for p, m in methods_of(loaded, "default"):
        close(m.delta_weight().detach(), dense(model, "t0")[p] - 2.0 * dense(model, "t1")[p])
