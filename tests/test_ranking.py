"""The one rank distance (console, early stop and the report's Fig. 5) and Kendall's tau-b."""

import math

import numpy as np
import pandas as pd
import pytest

from pipeline import report
from pipeline.ranking import average_ranks, kendall_tau_b, rank_distance, rank_distance_matrix

NAN = math.nan
# Three layers: 3 allowed ops, 4 ops, and a layer with a single allowed op.
PREV = np.array([[0.5, 0.5, 0.2, NAN],
                 [0.3, 0.2, 0.1, 0.0],
                 [0.7, NAN, NAN, NAN]])
CUR = np.array([[0.5, 0.9, 0.1, NAN],
                [0.2, 0.2, 0.2, 0.2],  # every gamma equal, as in an untrained supernet
                [0.1, NAN, NAN, NAN]])


def test_rank_distance_with_ties_hand_computed():
    # Layer 0, 3 ops. PREV ranks: 0.5 and 0.5 tie for ranks 0 and 1 -> both 0.5; 0.2 -> 2.
    #   CUR ranks: 0.9 -> 0, 0.5 -> 1, 0.1 -> 2, i.e. [1, 0, 2].
    #   L1 = |0.5 - 1| + |0.5 - 0| + |2 - 2| = 1; max floor(3^2 / 2) = 4 -> 0.25.
    # Layer 1, 4 ops. PREV ranks [0, 1, 2, 3]; CUR: a four-way tie, each (0+1+2+3)/4 = 1.5.
    #   L1 = 1.5 + 0.5 + 0.5 + 1.5 = 4; max floor(4^2 / 2) = 8 -> 0.5.
    # Layer 2 has one allowed op: no ranking to compare, left out of the average.
    # Average over the two layers: (0.25 + 0.5) / 2 = 0.375. (Pooled, 5 / 12, would differ.)
    assert rank_distance(PREV, CUR) == pytest.approx(0.375)
    assert rank_distance(CUR, PREV) == pytest.approx(0.375)
    assert rank_distance(PREV, PREV) == 0.0
    assert math.isnan(rank_distance(None, CUR))


def test_average_ranks():
    np.testing.assert_array_equal(average_ranks(np.array([0.5, 0.5, 0.2])), [0.5, 0.5, 2.0])
    np.testing.assert_array_equal(average_ranks(np.array([1.0, 3.0, 2.0, 3.0])), [3.0, 0.5, 2.0, 0.5])


def test_report_matrix_is_the_console_distance():
    tables = [PREV, CUR, -PREV]  # -PREV: every ranking reversed (ties stay ties)
    m = rank_distance_matrix(tables)
    assert m.shape == (3, 3) and (np.diag(m) == 0).all() and np.array_equal(m, m.T)
    assert m[0, 1] == rank_distance(PREV, CUR) and m[1, 2] == rank_distance(CUR, -PREV)
    assert m[0, 2] == 1.0  # reversed in every layer
    long = pd.DataFrame([{"epoch": e, "layer": l, "choice": c, "op": f"op{c}", "score": v}
                         for e, t in enumerate(tables) for l, row in enumerate(t) for c, v in enumerate(row)])
    np.testing.assert_array_equal(report.rank_distance_matrix(long), m)


def test_kendall_tau_b():
    assert kendall_tau_b([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau_b([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # One discordant pair of 6, no ties: (5 - 1) / 6.
    assert kendall_tau_b([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    # x ties pair (0, 1); the other 5 pairs are concordant: 5 / sqrt((6 - 1) * (6 - 0)).
    assert kendall_tau_b([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / math.sqrt(30))
    assert math.isnan(kendall_tau_b([1, 1, 1], [1, 2, 3]))
