"""Pure score functions against hand-computed values."""

import pytest
import torch

from sensitivity.attribution import owl_outlier_ratio, wanda_score
from sensitivity.core.scores import fisher_score, gblm_score, input_norm, max_over_median, taylor_score


def test_wanda_linear_broadcasts_along_columns():
    w = torch.tensor([[1.0, -2.0, 0.5], [-3.0, 0.0, 4.0]])  # (out=2, in=3)
    norm = torch.tensor([2.0, 10.0, 0.5])  # (in,)
    expected = torch.tensor([[2.0, 20.0, 0.25], [6.0, 0.0, 2.0]])
    assert torch.equal(wanda_score(w, norm), expected)


def test_wanda_depthwise_conv_broadcasts_along_channels():
    w = torch.tensor([[[1.0, -2.0]], [[3.0, -0.5]]])  # (C=2, 1, K=2)
    norm = torch.tensor([3.0, 2.0])  # (C,)
    expected = torch.tensor([[[3.0, 6.0]], [[6.0, 1.0]]])
    assert torch.equal(wanda_score(w, norm), expected)


@pytest.mark.parametrize(
    "shape,norm,match",
    [((2, 3), 2, "columns of \\(2, 3\\)"), ((4, 1, 3), 3, "rows of \\(4, 1, 3\\)"), ((2, 2, 3), 2, "depthwise")],
)
def test_wanda_rejects_mismatched_shapes(shape, norm, match):
    with pytest.raises(ValueError, match=match):
        wanda_score(torch.ones(shape), torch.ones(norm))


def test_owl_outlier_ratio_hand_computed():
    # mean = (1*7 + 2 + 30 + 40) / 10 = 7.9; threshold 5 * 7.9 = 39.5: only 40 is above it.
    scores = torch.tensor([1.0] * 7 + [2.0, 30.0, 40.0])
    assert owl_outlier_ratio(scores, 5.0) == pytest.approx(0.1)
    # threshold 3 * 7.9 = 23.7: 30 and 40 are above it; shape does not matter.
    assert owl_outlier_ratio(scores.view(2, 5), 3.0) == pytest.approx(0.2)
    assert owl_outlier_ratio(torch.ones(4), 1.0) == 0.0  # strictly greater
    with pytest.raises(ValueError, match="empty"):
        owl_outlier_ratio(torch.zeros(0))


def test_max_over_median_interpolates_even_counts():
    assert max_over_median(torch.tensor([1.0, 2.0, 4.0, 10.0])) == pytest.approx(10.0 / 3.0)
    assert max_over_median(torch.tensor([3.0, 1.0, 6.0])) == pytest.approx(2.0)


def test_input_norm_divides_by_windows():
    assert torch.allclose(input_norm(torch.tensor([8.0, 18.0]), 2), torch.tensor([2.0, 3.0]))
    with pytest.raises(ValueError, match="n_windows"):
        input_norm(torch.ones(2), 0)


def test_taylor_fisher_gblm_hand_computed():
    w = torch.tensor([[2.0, -1.0]])  # (1, 2)
    g_mean = torch.tensor([[-0.5, 3.0]])
    assert torch.equal(taylor_score(w, g_mean), torch.tensor([[1.0, 3.0]]))
    assert torch.equal(fisher_score(torch.tensor([[4.0, 9.0]])), torch.tensor([[4.0, 9.0]]))
    # |W| ||X|| + alpha |W| ||G||: [2*3 + 10*2*0.5, 1*4 + 10*1*0.25] = [16, 6.5]
    got = gblm_score(w, torch.tensor([3.0, 4.0]), torch.tensor([[0.5, 0.25]]), alpha=10.0)
    assert torch.equal(got, torch.tensor([[16.0, 6.5]]))
    with pytest.raises(ValueError, match="grad_l2"):
        gblm_score(w, torch.ones(2), torch.ones(2), 1.0)
