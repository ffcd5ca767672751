"""Border genes from the spots on either side of touching types: a hand-computed case and the edge cases."""

import numpy as np
import pytest

from segjointgene.results.borders import border_expression, near_types


def _section():
    classes = np.zeros((10, 20), np.int64)
    classes[:, :10], classes[:, 10:] = 1, 2  # type 1 left, type 2 right of column 10
    # side a: 30 x gene 0 and 10 x gene 2 at column 8 (2 px from type 2); side b: 30 x gene 1, 10 x gene 2 at 11
    x = np.r_[np.full(40, 8.5), np.full(40, 11.5), [0.5, 19.5]]  # two far spots, ignored
    y = np.tile(np.linspace(0.5, 9.5, 40), 2).tolist() + [5.0, 5.0]
    gene = np.r_[np.zeros(30), np.full(10, 2), np.ones(30), np.full(10, 2), [1, 0]].astype(int)
    spot_class = np.r_[np.ones(40), np.full(40, 2), [1, 2]].astype(int)
    return classes, spot_class, x, np.asarray(y), gene


def test_two_proportion_z_by_hand():
    classes, spot_class, x, y, gene = _section()
    t = border_expression(classes, spot_class, x, y, gene, ["g0", "g1", "g2"], ["bg", "A", "B"], min_side=5)
    assert t[["type_a", "type_b"]].drop_duplicates().values.tolist() == [["A", "B"]]
    t = t.set_index("gene")
    # gene 0: 30 of 40 on side a, 0 of 40 on side b; pooled 30 / 80, se = sqrt(.375 * .625 * (1/40 + 1/40))
    z = 0.75 / np.sqrt(0.375 * 0.625 * 0.05)
    assert t.loc["g0", "score"] == pytest.approx(z) and t.loc["g1", "score"] == pytest.approx(-z)
    assert t.loc["g2", "score"] == 0.0 and t["rank"].tolist() == [1, 2, 3]
    assert t.loc["g0", "log2_ratio"] == pytest.approx(np.log2((30.5 / 41.5) / (0.5 / 41.5)))
    assert (t["spots_a"] == 40).all() and (t["spots_b"] == 40).all()


def test_far_spots_small_sides_and_one_type():
    classes, spot_class, x, y, gene = _section()
    assert border_expression(classes, spot_class, x, y, gene, ["g0", "g1", "g2"], ["bg", "A", "B"], width=1).empty
    assert border_expression(classes, spot_class, x, y, gene, ["g0", "g1", "g2"], ["bg", "A", "B"],
                             min_side=41).empty  # too few spots on a side
    near = near_types(classes, np.array([-3.0, 9.5]), np.array([1.0, 1.0]), 3, 1)
    assert near.tolist() == [[False, False, False], [False, True, True]]  # outside the mask: nothing near
