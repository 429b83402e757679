import pytest
import torch

from sensitivity.core.masks import Structure, nm_mask, parse_structure, unstructured_mask


def test_unstructured_mask_by_hand():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.5, 0.5, 9.0, 0.1]])
    assert unstructured_mask(scores, 0.5).tolist() == [[True, False, True, False], [False, True, True, False]]
    assert unstructured_mask(scores, 0.25, per_row=False).tolist() == [[True, True, True, True],
                                                                        [False, True, True, False]]
    assert unstructured_mask(scores, 0.0).all()


def test_unstructured_mask_count_and_threshold():
    scores = torch.rand(7, 50, generator=torch.Generator().manual_seed(0))
    keep = unstructured_mask(scores, 0.3)
    assert (~keep).sum(1).tolist() == [15] * 7  # int(50 * 0.3) per row
    for row, k in zip(scores, keep):  # every removed score is <= every kept score in its row
        assert row[~k].max() <= row[k].min()
    keep = unstructured_mask(scores, 0.3, per_row=False)
    assert (~keep).sum().item() == int(350 * 0.3)
    assert scores[~keep].max() <= scores[keep].min()


def test_nm_mask_pattern_holds_in_every_group():
    scores = torch.randn(16, 64, generator=torch.Generator().manual_seed(1)).abs()
    for n, m in ((2, 4), (4, 8), (1, 4)):
        keep = nm_mask(scores, n, m)
        groups = keep.reshape(16, -1, m)
        assert (groups.sum(-1) == n).all()
        g = scores.reshape(16, -1, m)  # kept entries are the n largest of their group
        kept_min = torch.where(groups, g, torch.inf).amin(-1)
        dropped_max = torch.where(~groups, g, -torch.inf).amax(-1)
        assert (dropped_max <= kept_min).all()
    assert nm_mask(torch.tensor([[4.0, 1.0, 3.0, 2.0]]), 2, 4).tolist() == [[True, False, True, False]]


def test_nm_mask_on_conv_kernel_taps():
    scores = torch.tensor([[[1.0, 5.0, 2.0, 4.0]], [[9.0, 8.0, 0.0, 1.0]]])  # (C, 1, K)
    assert nm_mask(scores, 2, 4).tolist() == [[[False, True, False, True]], [[True, True, False, False]]]


def test_nm_errors():
    with pytest.raises(ValueError, match="multiple of 4; got 6"):
        nm_mask(torch.ones(2, 6), 2, 4)
    with pytest.raises(ValueError, match="0 < n < m"):
        nm_mask(torch.ones(2, 8), 4, 4)


def test_parse_structure():
    assert parse_structure("2:4") == (2, 4) and parse_structure("4:8") == (4, 8)
    assert parse_structure(None) is None and parse_structure("unstructured") is None and parse_structure("0:0") is None
    for bad in ("4:2", "2-4", "0:4", "a:b"):
        with pytest.raises(ValueError, match="allowed: 'unstructured' or 'n:m'"):
            parse_structure(bad)


def test_structure_type_normalises_and_names_the_field():
    from sensitivity.core.spec import Spec, SpecError

    class Options(Spec):
        structure: Structure = None

    assert Options(structure="2:4").structure == "2:4" and Options(structure="unstructured").structure is None
    with pytest.raises(SpecError, match=r"^structure: '3:2' is invalid; allowed: 'unstructured' or 'n:m'") as e:
        Options(structure="3:2")
    assert e.value.field == "structure"
