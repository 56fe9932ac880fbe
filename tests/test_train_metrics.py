import math

import numpy as np
import pytest

from hpa_kernel.train.metrics import image_ap as average_precision, macro_f1, macro_map


def test_average_precision_on_paper():
    # ranks: pos, neg, pos -> precisions 1 and 2/3 -> AP = (1 + 2/3) / 2
    assert average_precision(np.array([0.9, 0.8, 0.7]), np.array([1, 0, 1])) == pytest.approx(5 / 6)
    assert average_precision(np.array([0.9, 0.8]), np.array([1, 1])) == 1.0
    assert math.isnan(average_precision(np.array([0.1]), np.array([0])))


def test_macro_metrics_skip_absent_classes():
    t = np.zeros((4, 19))
    t[:2, 0] = 1
    t[2:, 5] = 1
    p = np.zeros((4, 19))
    p[:2, 0] = 0.9  # class 0 perfect
    p[:, 5] = [0.6, 0.1, 0.4, 0.7]  # class 5: one of two found at 0.5, one false positive
    assert macro_f1(p, t) == pytest.approx((1.0 + 0.5) / 2)
    ap5 = average_precision(p[:, 5], t[:, 5])
    assert macro_map(p, t) == pytest.approx((1.0 + ap5) / 2)
    assert math.isnan(macro_f1(p, np.zeros_like(t)))
