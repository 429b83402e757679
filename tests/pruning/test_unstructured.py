import pytest
import torch

from sensitivity.allocation import Schedule
from sensitivity.core import load_model
from sensitivity.data import Windows
from sensitivity.pruning import prune, prune_unstructured, sparsity_report

TINY = ["tiny:mamba", "tiny:mamba2", "tiny:falcon-mamba"]


def _windows(n=4, L=32, seed=0):
    ids = torch.randint(0, 257, (n, L), generator=torch.Generator().manual_seed(seed))
    return Windows(ids=ids, seqlen=L, split="train", source="test", kind="calibration", seed=seed, stride=0)


def _in_proj_inputs(lm, windows, layer):
    """The input of in_proj in ``layer``, read with a plain torch pre-hook (independent of the hook points)."""
    got = []
    module = lm.registry.mixer(lm.model, layer).in_proj
    handle = module.register_forward_pre_hook(lambda mod, args: got.append(args[0].detach().flatten(0, 1)))
    with torch.no_grad():
        lm.model(windows.ids, use_cache=False)
    handle.remove()
    return torch.cat(got)  # (tokens, D)


@pytest.mark.parametrize("name", TINY)
def test_wanda_mask_equals_independent_computation(name):
    lm, windows = load_model(name), _windows()
    dense = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    x = _in_proj_inputs(lm, windows, 1)  # (tokens, D)
    norm = (x.square().sum(0) / len(windows)).sqrt()  # (D,)  WANDA's sqrt(scaler_row)
    prune_unstructured(lm, "wanda", sparsity=0.5, windows=windows)
    w0 = dense["backbone.layers.1.mixer.in_proj.weight"]  # (rows, D)
    w1 = lm.registry.mixer(lm.model, 1).in_proj.weight.detach()
    metric = w0.abs() * norm[None, :]
    k = w0.shape[1] // 2
    expected = torch.ones_like(w0, dtype=torch.bool)
    expected.scatter_(1, torch.argsort(metric, dim=1)[:, :k], False)  # the k lowest of each row
    assert torch.equal(w1 != 0, expected)
    assert torch.equal(w1[expected], w0[expected])  # kept weights untouched


def test_wanda_prunes_each_slice_at_its_own_sparsity():
    lm, windows = load_model("tiny:mamba2"), _windows()
    sizes = lm.registry.weight_sizes(lm.model, ["z", "x", "B", "out_proj"])
    wanted = {(0, "z"): 0.25, (0, "x"): 0.5, (1, "B"): 0.75, (1, "out_proj"): 0.5}
    schedule = Schedule(arch="mamba2", n_layers=2, sparsity=wanted, params={k: sizes[k] for k in wanted},
                        method="custom", budget=None, exclude=("conv1d",), meta={})
    prune_unstructured(lm, "wanda", schedule=schedule, windows=windows)
    report = sparsity_report(lm).set_index(["layer", "component"])
    for (layer, comp), s in wanted.items():
        (t,) = lm.registry.weights(comp)
        w = t.get(lm.registry.mixer(lm.model, layer))
        assert ((w == 0).sum(1) == int(w.shape[1] * s)).all(), (layer, comp)
        assert report.loc[(layer, comp), "sparsity"] == pytest.approx(int(w.shape[1] * s) / w.shape[1])
    assert report.loc[(0, "B"), "zeros"] == 0 and report.loc[(1, "x"), "zeros"] == 0


def test_magnitude_per_tensor_threshold():
    lm = load_model("tiny:mamba")
    dense = lm.registry.mixer(lm.model, 0).out_proj.weight.detach().clone()
    prune_unstructured(lm, "magnitude", sparsity=0.3, compare="tensor")
    w = lm.registry.mixer(lm.model, 0).out_proj.weight.detach()
    removed = w == 0
    assert removed.sum().item() == int(dense.numel() * 0.3)
    assert dense[removed].abs().max() <= dense[~removed].abs().min()
    assert (lm.registry.mixer(lm.model, 0).conv1d.weight != 0).all()  # conv1d excluded by default


@pytest.mark.parametrize("structure,n,m", [("2:4", 2, 4), ("4:8", 4, 8)])
@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_nm_pattern_holds_in_every_group(method, structure, n, m):
    lm = load_model("tiny:mamba2")
    prune_unstructured(lm, method, structure=structure, windows=_windows(), exclude=())
    for layer in range(2):
        mixer = lm.registry.mixer(lm.model, layer)
        for comp in ("z", "x", "B", "C", "dt", "out_proj", "conv1d"):
            for t in lm.registry.weights(comp):
                w = t.get(mixer).detach()
                groups = (w != 0).reshape(-1, m)  # rows of linear weights; flattened taps of conv1d
                assert (groups.sum(-1) == n).all(), (layer, comp)


def test_sequential_calibrates_on_pruned_outputs():
    windows = _windows()
    seq = load_model("tiny:mamba2")
    prune_unstructured(seq, "wanda", sparsity=0.5, windows=windows, sequential=True)
    # by hand: layer 0 from the dense model, then layer 1 one-shot on the model whose layer 0 is pruned
    ref = load_model("tiny:mamba2")
    for layer in range(2):
        comps = [c for c in ref.registry.prunable_components if c != "conv1d"]
        sizes = ref.registry.weight_sizes(ref.model, comps)
        entries = {(layer, c): 0.5 for c in comps}
        schedule = Schedule(arch="mamba2", n_layers=2, sparsity=entries, params={k: sizes[k] for k in entries},
                            method="custom", budget=None, exclude=("conv1d",), meta={})
        prune_unstructured(ref, "wanda", schedule=schedule, windows=windows)
    for (name, a), (_, b) in zip(seq.model.named_parameters(), ref.model.named_parameters()):
        assert torch.equal(a, b), name
    one_shot = load_model("tiny:mamba2")
    prune_unstructured(one_shot, "wanda", sparsity=0.5, windows=windows)
    l0 = [lm.registry.mixer(lm.model, 0).in_proj.weight for lm in (seq, one_shot)]
    l1 = [lm.registry.mixer(lm.model, 1).in_proj.weight for lm in (seq, one_shot)]
    assert torch.equal(l0[0], l0[1]) and not torch.equal(l1[0], l1[1])


def test_sparsity_zero_is_identity():
    lm = load_model("tiny:mamba2")
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    prune(lm, "wanda", sparsity=0.0, windows=_windows())
    assert all(torch.equal(before[n], p) for n, p in lm.model.named_parameters())


def test_errors():
    lm, windows = load_model("tiny:mamba2"), _windows()
    cases = [
        (dict(method="sparsegpt", sparsity=0.5), "unknown pruning method 'sparsegpt'; allowed: magnitude, wanda"),
        (dict(method="wanda", sparsity=1.0, windows=windows), "sparsity: 1.0 is out of range; allowed: 0 <= value < 1"),
        (dict(method="wanda", sparsity=0.5), "windows: wanda needs calibration windows"),
        (dict(method="magnitude"), "sparsity: magnitude needs a sparsity, a schedule or an n:m structure"),
        (dict(method="magnitude", sparsity=0.3, structure="2:4"), "sparsity: 0.3 contradicts structure '2:4'"),
        (dict(method="magnitude", sparsity=0.5, compare="layer"),
         "options.compare: 'layer' is invalid; allowed: one of 'row' or 'tensor'"),
        (dict(method="magnitude", structure="3:2"), "options.structure: '3:2' is invalid"),
        (dict(method="head", sparsity=0.5), "options.mode"),
    ]
    for kwargs, message in cases[:-1]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            prune_unstructured(lm, **kwargs)
    with pytest.raises(ValueError, match="'head' is not a weight pruner"):
        prune_unstructured(lm, "head", sparsity=0.5, score="magnitude")
    bad = Schedule(arch="mamba2", n_layers=2, sparsity={(0, "x"): 0.5}, params={(0, "x"): 1},
                   method="custom", budget=None, exclude=(), meta={})
    with pytest.raises(ValueError, match="options.structure: '2:4' fixes the sparsity"):
        prune_unstructured(lm, "magnitude", schedule=bad, structure="2:4")
    with pytest.raises(ValueError, match="schedule: give either a sparsity or a schedule, not both"):
        prune_unstructured(lm, "magnitude", schedule=bad, sparsity=0.5)
    with pytest.raises(ValueError, match="schedule: dict is not a sensitivity.allocation.Schedule"):
        prune_unstructured(lm, "magnitude", schedule={})
    with pytest.raises(ValueError, match="unknown pruning method 'prune'"):
        prune(lm, "prune", sparsity=0.5)
    api_cases = [
        (dict(method="wanda", sparsity=0.5, windows=windows, score="flap"),
         "options.score: not an option of 'wanda'; its options: structure, compare, components, exclude, sequential"),
        (dict(method="magnitude", sparsity=0.5, mode="mask"), "options.mode: not an option of 'magnitude'"),
        (dict(method="magnitude", sparsity=0.5, sequential=True), "options.sequential: not an option of 'magnitude'"),
        (dict(method="head", sparsity=0.5, windows=windows, structure="2:4"),
         "options.structure: not an option of 'head'"),
        (dict(method="state", sparsity=0.5, sequential=True), "options.sequential: not an option of 'state'"),
        (dict(method="wanda", sparsity=[0.5, 0.5], windows=windows), "sparsity: wanda takes one sparsity"),
        (dict(method="magnitude", sparsity=0.5, batch_size=0),
         "batch_size: 0 is out of range; allowed: 1 <= value <= 67,108,864"),
        (dict(method="magnitude", sparsity=0.5, seed=True), "seed: True is a boolean"),
    ]
    for kwargs, message in api_cases:
        with pytest.raises(ValueError, match=message):
            prune(lm, **kwargs)
    assert all((p != 0).all() for n, p in lm.model.named_parameters() if n.endswith("in_proj.weight"))
