"""Packing plans: every response token placed exactly once, in a row of its own group, and found again by `back`."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxrl_llm.trainer.packing import packed_rows_multiple, plan_packing


@st.composite
def _masks(draw):
    group = draw(st.integers(1, 4))
    num_micro = draw(st.integers(1, 3))
    groups_per_micro = draw(st.integers(1, 3))
    width = draw(st.integers(1, 12))
    rows = num_micro * groups_per_micro * group
    lengths = draw(st.lists(st.integers(0, width), min_size=rows, max_size=rows))
    mask = np.arange(width)[None, :] < np.asarray(lengths)[:, None]
    # holes in a mask do not shorten the packed response: it runs up to its last token in the loss
    holes = draw(st.lists(st.tuples(st.integers(0, rows - 1), st.integers(0, width - 1)), max_size=3))
    for r, t in holes:
        if t + 1 < lengths[r]:
            mask[r, t] = False
    return mask, np.asarray(lengths), group, num_micro


@settings(max_examples=150, deadline=None)
@given(_masks())
def test_every_token_is_packed_once_in_its_group(case):
    mask, lengths, group, num_micro = case
    rows, width = mask.shape
    plan = plan_packing(mask, group=group, num_micro=num_micro, row_multiple=4)
    per_micro = rows // num_micro
    rows_p = plan.src.shape[0] // num_micro
    assert plan.src.shape == (num_micro * rows_p, width) and rows_p % 4 == 0
    src = plan.src.reshape(num_micro, rows_p, width)
    seg = plan.segment.reshape(num_micro, rows_p, width)
    off = plan.offset.reshape(num_micro, rows_p, width)
    grp = plan.group.reshape(num_micro, rows_p)
    back = plan.back.reshape(num_micro, per_micro, width)
    for m in range(num_micro):
        used = seg[m] > 0
        placed = src[m][used]
        # each (row, t) with t < length appears exactly once, and nothing else does
        expected = sorted(r * width + t for r in range(per_micro) for t in range(lengths[m * per_micro + r]))
        assert sorted(placed.tolist()) == expected
        assert np.array_equal(off[m][used], placed % width)
        # a packed row's responses all belong to the row's group, and a segment is one response, in order
        assert np.all(placed // width // group == np.broadcast_to(grp[m][:, None], used.shape)[used])
        for i in range(rows_p):
            for s in set(seg[m, i][seg[m, i] > 0].tolist()):
                cells = src[m, i][seg[m, i] == s]
                assert len(set((cells // width).tolist())) == 1 and np.array_equal(np.diff(cells), np.ones(len(cells) - 1))
        # back finds each token of the loss where it was put
        for r in range(per_micro):
            for t in range(lengths[m * per_micro + r]):
                flat = back[m, r, t]
                assert src[m].reshape(-1)[flat] == r * width + t


def test_packing_saves_rows_and_rejects_split_groups():
    lengths = np.array([10, 2, 3, 5, 1, 1, 8, 2])  # two groups of four, width 10
    mask = np.arange(10)[None, :] < lengths[:, None]
    plan = plan_packing(mask, group=4, num_micro=1, row_multiple=1)
    # group 1: 10 | 5+3+2; group 2: 8+2 | ... first-fit decreasing: [8, 2], [1, 1] -> 4 rows instead of 8
    assert plan.src.shape == (4, 10)
    assert plan.group.tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="whole groups"):
        plan_packing(mask, group=3, num_micro=1)


@pytest.mark.parametrize("shards", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("micro", [8, 24, 64, 96, 512, 4096])
def test_packed_row_counts_take_few_shapes(shards, micro):
    step = packed_rows_multiple(shards, micro)
    assert step % 8 == 0 and step % shards == 0
    # every packed row count from 1 to micro rounds up to one of at most 8 sizes, none a whole step above micro
    sizes = {-(-k // step) * step for k in range(1, micro + 1)}
    assert len(sizes) <= 8
    assert max(sizes) < micro + step
