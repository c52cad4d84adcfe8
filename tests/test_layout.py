"""Layout unit and property tests (DESIGN contract 1), host-free."""
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dual_rope import METHODS, layout, layout_ids, pack, placement_ids, unpack

grid = st.tuples(st.integers(1, 40), st.integers(1, 40))


@settings(max_examples=200, deadline=None)
@given(target=grid, refs=st.lists(grid, min_size=1, max_size=5))
def test_diagonal_references_share_no_row_or_column(target, refs):
    placed = layout(target, refs, "diagonal")[1:]
    for a, b in itertools.combinations(placed, 2):
        assert not set(a.rows()) & set(b.rows())
        assert not set(a.cols()) & set(b.cols())
    assert all(p.index == 1 for p in placed)
    # each reference keeps its own grid: nothing resized or padded to fit another
    assert [(p.height, p.width) for p in placed] == [tuple(r) for r in refs]


@given(target=grid, ref=grid)
def test_one_reference_is_native_kontext(target, ref):
    for method in ("diagonal", "offset"):
        t, r = layout(target, [ref], method)
        assert (t.index, t.row, t.col) == (0, 0, 0)
        assert (r.index, r.row, r.col) == (1, 0, 0)


def test_ids_are_row_major_and_match_placement():
    t, r1, r2 = layout((2, 3), [(2, 2), (1, 2)], "diagonal")
    ids = layout_ids([t, r1, r2])
    assert ids.shape == (6 + 4 + 2, 3)
    assert ids[:6].tolist() == [[0, i, j] for i in range(2) for j in range(3)]
    assert ids[6:10].tolist() == [[1, i, j] for i in range(2) for j in range(2)]
    assert ids[10:].tolist() == [[1, 2, 2], [1, 2, 3]]
    assert torch.equal(placement_ids(r2), ids[10:])


def test_other_methods():
    _, a, b = layout((4, 4), [(3, 2), (2, 5)], "index")
    assert (a.index, a.row, a.col, b.index, b.row, b.col) == (1, 0, 0, 2, 0, 0)
    _, a, b = layout((4, 4), [(3, 2), (2, 5)], "uxo")
    assert (a.index, a.row, a.col) == (0, 4, 4) and (b.index, b.row, b.col) == (0, 7, 6)
    _, a, b = layout((4, 4), [(3, 2), (2, 5)], "offset")
    assert (a.row, a.col) == (0, 0) and (b.row, b.col) == (3, 0)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="unknown layout method 'diag'"):
        layout((2, 2), [(2, 2)], "diag")
    with pytest.raises(ValueError, match="reference 2"):
        layout((2, 2), [(2, 2), (0, 3)])


@pytest.mark.parametrize("hw", [(8, 8), (6, 10), (7, 5)])
def test_pack_unpack_roundtrip_is_exact(hw):
    x = torch.randn(2, 16, *hw)
    tokens = pack(x)
    assert tokens.shape == (2, ((hw[0] + 1) // 2) * ((hw[1] + 1) // 2), 64)
    assert torch.equal(unpack(tokens, hw), x)


def test_methods_listed():
    assert METHODS[0] == "diagonal"
