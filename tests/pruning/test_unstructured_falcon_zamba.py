"""WANDA on Falcon-H1 (parallel SSM + attention, µP multipliers) and Zamba2 (hybrid layers that read the input
embeddings and share one transformer block): sequential equals layer by layer, masks equal an independent
computation."""

from __future__ import annotations

import pytest
import torch

from sensitivity.allocation import Schedule
from sensitivity.core import load_model
from sensitivity.data import Windows
from sensitivity.pruning import prune_unstructured

NAMES = ["tiny:falcon-h1", "tiny:zamba2"]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these tiny models gain nothing from more, and on busy shared cores they lose 10x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _windows(n=4, L=24, seed=0) -> Windows:
    ids = torch.randint(0, 257, (n, L), generator=torch.Generator().manual_seed(seed))
    return Windows(ids=ids, seqlen=L, split="train", source="test", kind="calibration", seed=seed, stride=0)


def _layer_schedule(lm, layer: int, sparsity: float) -> Schedule:
    """WANDA's default components (conv1d excluded) of one layer at ``sparsity``."""
    reg = lm.registry
    comps = [c for c in reg.resolve() if reg.has(layer, c)]
    sizes = reg.weight_sizes(lm.model, comps)
    entries = {(layer, c): sparsity for c in comps}
    return Schedule(arch=reg.arch, n_layers=reg.n_layers, sparsity=entries, params={k: sizes[k] for k in entries},
                    method="custom", budget=None, exclude=("conv1d",), meta={}, units=reg.units)  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_sequential_wanda_equals_one_shot_layer_by_layer(name):
    """Sequential WANDA (block by block through the runner) equals one-shot WANDA of one layer at a time through
    the HF forward of the model whose earlier layers are already pruned (an independent path)."""
    windows = _windows()
    seq = load_model(name)
    prune_unstructured(seq, "wanda", sparsity=0.5, windows=windows, sequential=True, batch_size=2, show_progress=False)
    ref = load_model(name)
    for layer in range(ref.registry.n_layers):
        prune_unstructured(ref, "wanda", schedule=_layer_schedule(ref, layer, 0.5), windows=windows, batch_size=2,
                           show_progress=False)  # fmt: skip
    differ = [n for (n, a), (_, b) in zip(seq.model.named_parameters(), ref.model.named_parameters())
              if not torch.equal(a != 0, b != 0)]  # fmt: skip
    assert not differ, differ
    # sequential calibration differs from one-shot after the first pruned layer
    one_shot = load_model(name)
    prune_unstructured(one_shot, "wanda", sparsity=0.5, windows=windows, batch_size=2, show_progress=False)
    reg, last = seq.registry, seq.registry.n_layers - 1
    assert not torch.equal(reg.mixer(seq.model, last).in_proj.weight, reg.mixer(one_shot.model, last).in_proj.weight)


@pytest.mark.parametrize("name", NAMES)
def test_one_shot_wanda_mask_of_attention_and_mlp_equals_independent_computation(name):
    """The q and down masks from |W| * ||X|| with X read by plain torch hooks on q_proj and the down projection."""
    lm, windows = load_model(name), _windows()
    reg = lm.registry
    layer = reg.layers_with("q")[0]  # Zamba2: the first use of the shared block prunes it (later ones keep its mask)
    attn, mlp = reg.unit(lm.model, layer, "attention"), reg.unit(lm.model, layer, "mlp")
    down = mlp.down_proj
    got: dict[str, list[torch.Tensor]] = {"q": [], "down": []}
    handles = [
        attn.q_proj.register_forward_pre_hook(lambda m, a: got["q"].append(a[0].detach().flatten(0, 1))),
        down.register_forward_pre_hook(lambda m, a: got["down"].append(a[0].detach().flatten(0, 1))),
    ]
    with torch.no_grad():
        lm.model(windows.ids, use_cache=False)
    for h in handles:
        h.remove()
    dense = {"q": attn.q_proj.weight.detach().clone(), "down": down.weight.detach().clone()}
    prune_unstructured(lm, "wanda", sparsity=0.5, windows=windows, show_progress=False)
    for key, module in (("q", attn.q_proj), ("down", down)):
        x = torch.cat(got[key])  # (tokens, C)
        metric = dense[key].abs() * (x.square().sum(0) / len(windows)).sqrt()[None, :]
        expected = torch.ones_like(metric, dtype=torch.bool)
        expected.scatter_(1, torch.argsort(metric, dim=1)[:, : metric.shape[1] // 2], False)
        assert torch.equal(module.weight != 0, expected), key
