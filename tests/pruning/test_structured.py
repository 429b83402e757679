"""SSM-structured pruning: pure score / selection math on hand-made tensors, and pruned tiny models checked against
the dense model (sparsity 0), each other (shrink vs mask), hand-sliced references, and their reloaded checkpoints."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from sensitivity.core import build_registry, capture, hook_name, instrument, selective_scan_ref, ssd_scan, tiny_config
from sensitivity.core.loading import as_loaded
from sensitivity.data import Windows
from sensitivity.pruning.structured import (
    expand_value,
    flap_bias,
    flap_scores,
    norm_factors,
    prune_structured,
    removal_counts,
    select_lowest,
    state_scores,
    taylor_entries,
    unit_index,
    unit_totals,
)

# The gated norm's eps makes masked heads / channels differ from removed ones by O(eps / mean(x**2)) (see
# norm_factors); models that compare the two use a negligible eps.
EXACT_NORM = {"layer_norm_epsilon": 1e-12}
D32 = {"hidden_size": 32, "expand": 4}  # ED = 128 = 4 * 32: one head per group (ED' = 96 = 3 * 32) still shrinks


def _model(arch: str = "mamba2", **overrides):
    """A tiny instrumented model whose parameters (zero conv biases, unit norms...) are all made non-trivial."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides)).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return as_loaded(instrument(model))


@pytest.fixture(scope="module")
def windows():
    ids = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(0))  # (n, L)
    return Windows(ids=ids, seqlen=32, split="train", source="test", kind="calibration", seed=0, stride=0)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(7))  # (B, L)


@torch.no_grad()
def _logits(lm, ids):
    return lm.model(ids, use_cache=False).logits  # (B, L, V)


# --- pure functions ------------------------------------------------------------------------------------------


def test_removal_counts_and_all_removed():
    assert removal_counts(16, [0.0, 0.25, 0.3, 0.999]) == [0, 4, 4, 15]
    assert removal_counts(10, [0.3]) == [3]  # 10 * 0.3 = 2.9999999999999996 without the 1e-9 guard
    with pytest.raises(ValueError, match="removes all 4 heads in layer 1; at most 3 of 4 can go"):
        removal_counts(4, [0.5, 1 - 1e-12], "heads")


def test_select_lowest_per_row_ties_by_position():
    scores = torch.tensor([[3.0, 1.0, 2.0, 0.5], [1.0, 1.0, 1.0, 0.0]])  # (blocks, n)
    assert select_lowest(scores, 2).tolist() == [[1, 3], [0, 3]]
    assert select_lowest(scores, 0).shape == (2, 0)


def test_taylor_state_score_by_hand():
    # G = 2 groups, N = 2 states, 2 columns: rows are (g, n) = (0, 0), (0, 1), (1, 0), (1, 1).
    wb = torch.tensor([[1.0, 2.0], [0.0, 1.0], [3.0, 0.0], [1.0, 1.0]])
    wc = torch.tensor([[1.0, 0.0], [2.0, 2.0], [0.0, 0.0], [1.0, 3.0]])
    fb = torch.tensor([[4.0, 2.0], [8.0, 2.0], [2.0, 6.0], [2.0, 2.0]])  # summed g**2 over 2 windows
    fc = torch.full((4, 2), 2.0)
    b, c = taylor_entries(wb, fb, 2), taylor_entries(wc, fc, 2)
    assert b.tolist() == [[2.0, 4.0], [0.0, 1.0], [9.0, 0.0], [1.0, 1.0]]  # W**2 * fisher / 2
    # state 0: B rows (0,0), (1,0) means 3 + 4.5, C rows means 0.5 + 0; state 1: B 0.5 + 1, C 4 + 5
    assert state_scores(b, c, 2).tolist() == [8.0, 10.5]
    assert state_scores(b[:2], c[:2], 1).tolist() == [3.5, 4.5]


def test_flap_head_score_and_bias_by_hand():
    x = torch.tensor([[1.0, 2.0, 0.0, 4.0], [3.0, 2.0, 2.0, 0.0]])  # (tokens, C): 2 heads of P = 2
    w = torch.tensor([[1.0, 1.0, 2.0, 0.0], [0.0, 2.0, 1.0, 3.0]])  # (D, C)
    channel = flap_scores(x.mean(0), x.square().mean(0), w)
    assert channel.tolist() == [1.0 * 1.0, 0.0 * 5.0, 1.0 * 5.0, 4.0 * 9.0]  # Var(X_j) * ||W[:, j]||**2
    assert channel.view(2, 2).sum(1).tolist() == [1.0, 41.0]  # head scores
    assert flap_bias(w, x.mean(0), [0, 1]).tolist() == [2.0 + 2.0, 0.0 + 4.0]  # W[:, R] @ mean[R]


def test_norm_factors_and_unit_totals():
    assert torch.allclose(norm_factors([0, 1, 5], 8, 2), torch.tensor([math.sqrt(2 / 4), math.sqrt(3 / 4)]))
    index = {"a": (0, torch.tensor([[0, 2], [1, 3]])), "b": (1, torch.tensor([[1], [0]]))}
    index["c"] = (0, torch.tensor([[9]]))  # a parameter without values is skipped
    values = {"a": torch.tensor([[1.0, 1.0], [2.0, 0.0], [3.0, 0.0], [0.0, 5.0]]), "b": torch.tensor([[1.0, 2.0]])}
    assert unit_totals(values, index).tolist() == [2.0 + 3.0 + 2.0, 2.0 + 5.0 + 1.0]  # rows summed, then col sums


def test_expand_value_int_and_exact_float():
    assert expand_value(128, 64) == 2 and isinstance(expand_value(128, 64), int)
    inexact = []
    for inner in range(1, 4000, 7):
        for hidden in (96, 768, 1000, 2560):
            e = expand_value(inner, hidden)
            assert int(e * hidden) == inner
            if e * hidden != inner:
                inexact.append((inner, hidden))
    assert (1009, 1000) in inexact and len(inexact) < 20  # no float gives 1009 exactly; the config then refuses


def test_unit_index_rows_of_tiny_mamba2():
    reg = build_registry(tiny_config("mamba2"))  # D 64, ED 128, N 16, H 8, P 16, G 2: in_proj [z|x|B|C|dt]
    ED, GN = 128, 32
    state = unit_index(reg, "state")
    assert state["in_proj.weight"][1][3].tolist() == [2 * ED + 3, 2 * ED + 16 + 3, 2 * ED + GN + 3, 2 * ED + GN + 19]
    assert state["conv1d.weight"][1][3].tolist() == [ED + 3, ED + 19, ED + GN + 3, ED + GN + 19]
    head = unit_index(reg, "head")
    rows = head["in_proj.weight"][1][2].tolist()
    assert rows == list(range(32, 48)) + list(range(ED + 32, ED + 48)) + [2 * ED + 2 * GN + 2]
    assert head["out_proj.weight"][0] == 1 and head["A_log"][1][5].tolist() == [5]
    assert unit_index(reg, "headdim")["in_proj.weight"][1][37].tolist() == [37, ED + 37]
    m1 = unit_index(build_registry(tiny_config("mamba")), "state")  # x_proj [dt (R=8) | B | C], N = 8
    assert m1["x_proj.weight"][1][2].tolist() == [8 + 2, 16 + 2] and m1["A_log"][0] == 1


# --- models --------------------------------------------------------------------------------------------------

IDENTITY = [("mamba2", "state"), ("mamba2", "head"), ("mamba2", "headdim"), ("mamba", "state"),
            ("falcon_mamba", "state")]  # fmt: skip


@pytest.mark.parametrize("mode", ["auto", "mask"])
@pytest.mark.parametrize("arch,unit", IDENTITY)
def test_sparsity_zero_is_identity(arch, unit, mode, ids):
    lm = _model(arch)
    before, config = _logits(lm, ids), lm.model.config.to_dict()
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    result = prune_structured(lm, unit, 0.0, score="magnitude", mode=mode, show_progress=False)
    assert torch.equal(_logits(lm, ids), before)
    assert lm.model.config.to_dict() == config
    assert all(torch.equal(v, state[k]) for k, v in lm.model.state_dict().items())
    assert result.removed == {0: [], 1: []} and result.params_after == result.params_before


SHRINK_VS_MASK = [
    ("mamba2", EXACT_NORM, "state", 0.25, "taylor", {"state_size": 12}),
    ("mamba2", EXACT_NORM, "head", 0.5, "flap", {"num_heads": 4, "expand": 1, "use_bias": True}),
    ("mamba2", EXACT_NORM, "headdim", 0.5, "taylor", {"head_dim": 8, "expand": 1}),
    ("mamba2", {**EXACT_NORM, **D32}, "head", 0.25, "magnitude", {"num_heads": 6, "expand": 3}),
    ("mamba2", {**EXACT_NORM, **D32}, "headdim", 0.25, "flap", {"head_dim": 12, "expand": 3, "use_bias": True}),
    ("mamba", {}, "state", 0.5, "taylor", {"state_size": 4}),
]


@pytest.mark.parametrize("arch,overrides,unit,sparsity,score,config", SHRINK_VS_MASK)
def test_shrink_equals_mask(arch, overrides, unit, sparsity, score, config, windows, ids):
    results, logits = {}, {}
    for mode in ("shrink", "mask"):
        lm = _model(arch, **overrides)
        results[mode] = prune_structured(lm, unit, sparsity, windows=windows, score=score, mode=mode,
                                         show_progress=False)  # fmt: skip
        logits[mode] = _logits(lm, ids)
        if mode == "shrink":
            assert {k: getattr(lm.model.config, k) for k in config} == config
            assert lm.registry.dims == build_registry(lm.model.config).dims
    shrunk, masked = results["shrink"], results["mask"]
    assert shrunk.removed == masked.removed
    assert shrunk.params_after < shrunk.params_before
    assert (logits["shrink"] - logits["mask"]).abs().max() < 1e-5


def test_mask_differs_from_shrink_only_by_norm_eps(ids):
    out = {}
    for mode in ("shrink", "mask"):
        lm = _model("mamba2")  # eps 1e-5 against a gated mean square of about 1e-2
        prune_structured(lm, "head", 0.5, score="magnitude", mode=mode, show_progress=False)
        out[mode] = _logits(lm, ids)
    assert 1e-5 < (out["shrink"] - out["mask"]).abs().max() < 5e-2


def test_falcon_state_shrink_reloads_and_mask_only_approximates(ids, tmp_path, caplog):
    lm = _model("falcon_mamba")
    prune_structured(lm, "state", 0.25, score="magnitude", show_progress=False)
    lm.model.save_pretrained(tmp_path)
    reloaded = as_loaded(instrument(AutoModelForCausalLM.from_pretrained(tmp_path).eval()))
    assert torch.allclose(_logits(reloaded, ids), _logits(lm, ids), atol=1e-6)
    masked = _model("falcon_mamba")
    with caplog.at_level(logging.WARNING, logger="sensitivity.pruning.structured"):
        prune_structured(masked, "state", 0.25, score="magnitude", mode="mask", show_progress=False)
    assert "only approximate" in caplog.text
    assert (_logits(masked, ids) - _logits(lm, ids)).abs().max() > 1e-4


def test_head_shrink_matches_hand_sliced_reference(ids):
    """Heads are independent up to the gated norm: the shrunk mixer equals out_proj(norm(gated)) of the dense
    model restricted, by hand, to the kept heads' channels."""
    lm = _model("mamba2", **D32)
    points = [hook_name(0, "in"), hook_name(0, "gated")]
    with capture(lm, points) as acts:
        _logits(lm, ids)
    hidden, gated = acts[points[0]][0], acts[points[1]][0]  # (B, L, D), (B, L, ED)
    dense = lm.registry.mixer(lm.model, 0)
    norm_w, out_w, eps = dense.norm.weight.detach().clone(), dense.out_proj.weight.detach().clone(), 1e-5
    result = prune_structured(lm, "head", 0.25, score="magnitude", show_progress=False)  # 1 head of 4 per group
    assert result.mode == "shrink" and len(result.removed[0]) == 2
    assert lm.model.config.layer_norm_epsilon == eps
    kept = [h * 16 + p for h in range(8) if h not in result.removed[0] for p in range(16)]
    g = gated[..., kept].view(*gated.shape[:2], 2, 48)  # (B, L, G, ED'/G)
    normed = (g * torch.rsqrt(g.square().mean(-1, keepdim=True) + eps)).flatten(2) * norm_w[kept]  # (B, L, ED')
    expected = normed @ out_w[:, kept].T  # (B, L, D)
    with torch.no_grad():
        got = lm.registry.mixer(lm.model, 0)(hidden)  # (B, L, D)
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("arch", ["mamba2", "mamba"])
def test_state_shrink_matches_scan_on_kept_states(arch, ids):
    """The shrunk mixer equals the dense mixer's activations pushed through the reference scans with the kept
    states' columns of A, B and C sliced by hand."""
    lm = _model(arch)
    names = ["in", "u", "dt", "A", "B", "C", "z"]
    with capture(lm, [hook_name(0, n) for n in names]) as acts:
        _logits(lm, ids)
    a = {n: acts[hook_name(0, n)][0] for n in names}
    dense = lm.registry.mixer(lm.model, 0)
    D, norm, out_proj = dense.D.detach().clone(), dense.norm if arch == "mamba2" else None, dense.out_proj
    result = prune_structured(lm, "state", 0.25, score="magnitude", show_progress=False)
    keep = [n for n in range(lm.registry.dims["N"] + len(result.removed[0])) if n not in result.removed[0]]
    u = a["u"]  # (B, L, ED)
    if arch == "mamba2":
        H, P = 8, 16
        y = ssd_scan(u.view(*u.shape[:2], H, P), a["dt"], a["A"], a["B"][..., keep], a["C"][..., keep], chunk_size=32)
        y = (y + D[:, None] * u.view(*u.shape[:2], H, P)).flatten(2)  # (B, L, ED)
    else:
        y = selective_scan_ref(u, a["dt"], a["A"][:, keep], a["B"][..., keep], a["C"][..., keep]) + u * D
    gated = y * F.silu(a["z"])  # (B, L, ED)
    with torch.no_grad():
        expected = out_proj(norm(gated) if norm is not None else gated)  # (B, L, D)
        got = lm.registry.mixer(lm.model, 0)(a["in"])
    assert torch.allclose(got, expected, atol=1e-5)


def test_taylor_state_scores_match_autograd_fisher(windows):
    """The states removed are the lowest by sum over groups of mean(W**2 * mean_k g_k**2) over the B and C rows,
    with g_k the gradient of window k's mean next-token loss, computed here with plain autograd."""
    lm = _model("mamba2")
    w = lm.registry.mixer(lm.model, 1).in_proj.weight
    fisher = torch.zeros_like(w)
    for k in range(len(windows)):
        x = windows.ids[k : k + 1]
        logits = lm.model(x, use_cache=False).logits
        loss = F.cross_entropy(logits[0, :-1], x[0, 1:])
        (grad,) = torch.autograd.grad(loss, w)
        fisher += grad.square()
    per_row = (w.detach().square() * fisher / len(windows)).mean(1)  # (rows,)
    B, C = per_row[256:288].view(2, 16).sum(0), per_row[288:320].view(2, 16).sum(0)  # (N,)
    expected = sorted(torch.sort(B + C, stable=True).indices[:4].tolist())
    result = prune_structured(lm, "state", 0.25, windows=windows, score="taylor", show_progress=False)
    assert result.removed[1] == expected


def test_flap_head_scores_and_bias_compensation_by_hand(windows):
    lm = _model("mamba2")
    names = [hook_name(layer, "out_proj_in") for layer in range(2)]
    with capture(lm, names) as acts, torch.no_grad():
        for k in range(0, len(windows), 2):
            lm.model(windows.ids[k : k + 2], use_cache=False)
    X = [torch.cat([t.flatten(0, 1) for t in acts[n]]) for n in names]  # (tokens, ED) per layer
    W = [lm.registry.mixer(lm.model, layer).out_proj.weight.detach().clone() for layer in range(2)]
    result = prune_structured(lm, "head", 0.5, windows=windows, score="flap", show_progress=False)
    assert result.bias_compensation and result.use_bias_added and lm.model.config.use_bias
    for layer in range(2):
        fluct = X[layer].var(0, unbiased=False) * W[layer].square().sum(0)  # (ED,)
        heads = fluct.view(2, 4, 16).sum(-1)  # (G, H/G)
        expected = sorted((torch.sort(heads, dim=1, stable=True).indices[:, :2] + torch.tensor([[0], [4]])).flatten())
        assert result.removed[layer] == [int(h) for h in expected]
        gone = [h * 16 + p for h in result.removed[layer] for p in range(16)]
        bias = W[layer][:, gone] @ X[layer][:, gone].mean(0)  # (D,)
        mixer = lm.registry.mixer(lm.model, layer)
        assert torch.allclose(mixer.out_proj.bias, bias, atol=1e-5)
        assert torch.equal(mixer.in_proj.bias, torch.zeros(mixer.in_proj.out_features))


RELOAD = [
    ("mamba2", {}, "state", 0.25, "taylor", "shrink"),
    ("mamba2", {}, "head", 0.5, "flap", "shrink"),
    ("mamba2", D32, "headdim", 0.25, "flap", "shrink"),
    ("mamba2", D32, "head", 0.25, "taylor", "shrink"),
    ("mamba2", {}, "headdim", 0.25, "flap", "mask"),  # auto: 12 channels per head cannot be expressed, so masks
    ("mamba", {}, "state", 0.25, "magnitude", "shrink"),
]


@pytest.mark.parametrize("arch,overrides,unit,sparsity,score,mode", RELOAD)
def test_save_reload_gives_same_logits(arch, overrides, unit, sparsity, score, mode, windows, ids, tmp_path):
    lm = _model(arch, **overrides)
    result = prune_structured(lm, unit, sparsity, windows=windows, score=score, show_progress=False)
    assert result.mode == mode
    lm.model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # the plain HF forward
    shapes = lambda module: {k: v.shape for k, v in module.state_dict().items()}
    assert shapes(reloaded) == shapes(lm.model)
    with torch.no_grad():
        plain = reloaded(ids, use_cache=False).logits
    assert torch.allclose(plain, _logits(lm, ids), atol=1e-5)
    assert torch.equal(_logits(as_loaded(instrument(reloaded)), ids), _logits(lm, ids))
    json.dumps(result.to_dict())


@pytest.mark.parametrize("unit", ["state", "head", "headdim"])
def test_cached_generation_on_shrunk_model_matches_cache_free_forward(unit, ids):
    lm = _model("mamba2")
    assert prune_structured(lm, unit, 0.5, score="magnitude", show_progress=False).mode == "shrink"
    out = lm.model.generate(ids[:1, :6], max_new_tokens=4, do_sample=False)  # HF forward with its cache
    assert out[0, 6:].tolist() == _logits(lm, out[:, :-1])[0, 5:].argmax(-1).tolist()


def test_random_scores_follow_the_seed_and_keep_the_global_rng():
    removed = {}
    for seed in (0, 0, 1):
        lm = _model("mamba2")
        rng = torch.get_rng_state()
        result = prune_structured(lm, "headdim", 0.5, score="random", seed=seed, show_progress=False)
        assert torch.equal(torch.get_rng_state(), rng)
        removed.setdefault(seed, []).append(result.removed)
    assert removed[0][0] == removed[0][1] != removed[1][0]
    assert all(len(units) == 8 * 8 for units in removed[1][0].values())  # 8 of 16 channels in each of 8 heads


def test_per_layer_sparsity_masks_the_right_rows(caplog):
    lm = _model("mamba2")
    with caplog.at_level(logging.INFO, logger="sensitivity.pruning.structured"):
        result = prune_structured(lm, "state", [0.25, 0.5], score="magnitude", show_progress=False)
    assert result.mode == "mask" and "mode mask" in caplog.text and "[4, 8] differ" in caplog.text
    assert lm.model.config.state_size == 16 and result.params_after == result.params_before
    for layer, k in enumerate([4, 8]):
        mixer = lm.registry.mixer(lm.model, layer)
        rows = mixer.in_proj.weight.abs().sum(1) == 0  # (2ED+2GN+H,) whole zero rows
        assert int(rows.sum()) == 2 * 2 * k and bool(rows[256:320].sum() == 4 * k)  # B and C rows of both groups
        conv = mixer.conv1d.weight.abs().sum((1, 2)) + mixer.conv1d.bias.abs() == 0  # (ED+2GN,)
        assert int(conv.sum()) == 4 * k and len(result.removed[layer]) == k

    lm = _model("mamba2")
    norm_before = lm.registry.mixer(lm.model, 1).norm.weight.detach().clone()
    result = prune_structured(lm, "head", [0.25, 0.5], score="magnitude", show_progress=False)
    assert result.mode == "mask" and [len(result.removed[i]) for i in range(2)] == [2, 4]
    for layer, k in enumerate([2, 4]):
        mixer = lm.registry.mixer(lm.model, layer)
        assert int((mixer.in_proj.weight.abs().sum(1) == 0).sum()) == k * (2 * 16 + 1)
        assert int((mixer.out_proj.weight.abs().sum(0) == 0).sum()) == k * 16
        assert int((mixer.A_log == 0).sum()) == k and int((mixer.dt_bias == 0).sum()) == k
    kept = [h * 16 + p for h in range(8) if h not in result.removed[1] for p in range(16)]
    norm = lm.registry.mixer(lm.model, 1).norm.weight.detach()
    assert torch.allclose(norm[kept], norm_before[kept] * math.sqrt(0.5))


def test_errors_name_the_bad_value(windows):
    m2, m1 = _model("mamba2"), _model("mamba")
    cases = [
        (m2, ("neuron", 0.5), {}, "unknown pruning method 'neuron'; allowed: magnitude, wanda, state, head, headdim"),
        (m2, ("wanda", 0.5), {"windows": windows}, "method: 'wanda' is not a structured unit"),
        (m2, ("state", 0.5), {"score": "flap"},
         "options.score: 'flap' is invalid; allowed: one of 'taylor', 'magnitude' or 'random'"),
        (m1, ("head", 0.5), {}, "pruning method 'head' does not apply to mamba models; it needs mamba2"),
        (m1, ("headdim", 0.5), {}, "pruning method 'headdim' does not apply to mamba models"),
        (m2, ("state", 1.0), {"score": "magnitude"}, "sparsity: 1.0 is out of range; allowed: 0 <= value < 1"),
        (m2, ("state", [0.5, -0.1]), {"score": "magnitude"}, "sparsity.1: -0.1 is out of range"),
        (m2, ("state", [0.5, 0.5, 0.5]), {"score": "magnitude"}, "sparsity: 3 values for a model of 2 layers"),
        (m2, ("head", 1 - 1e-12), {"score": "magnitude"}, "removes all 4 heads of a B/C group"),
        (m2, ("state", [0.25, 0.5]), {"score": "magnitude", "mode": "shrink"}, "got per-layer counts \\[4, 8\\]"),
        (m2, ("headdim", 0.25), {"score": "magnitude", "mode": "shrink"},
         "num_heads\\*head_dim = 96 is not a multiple of hidden_size 64.*sparsities that shrink this model: 0.5;"),
        (m2, ("state", 0.5), {"mode": "fold"}, "options.mode: 'fold' is invalid; allowed: one of 'auto', 'shrink'"),
        (m2, ("state", 0.5), {"score": "taylor"}, "windows: state needs calibration windows"),
        (m2, ("head", 0.5), {}, "windows: head needs calibration windows"),
        (m2, ("state", 0.5), {"score": "random", "seed": 1.5}, "seed: 1.5 is invalid; allowed: an integer"),
    ]  # fmt: skip
    for lm, args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            prune_structured(lm, *args, show_progress=False, **kwargs)
    assert lm.model.config.num_heads == 8 and not lm.model.config.use_bias  # nothing changed on the way
    bare = AutoModelForCausalLM.from_config(tiny_config("mamba2"))
    with pytest.raises(ValueError, match="not instrumented"):
        prune_structured(bare, "state", 0.5, windows=windows, show_progress=False)
