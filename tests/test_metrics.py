import numpy as np

from pipeline.metrics import dice, dice_batch


def test_dice_known_answers():
    a = np.zeros((4, 4), np.uint8)
    b = np.zeros((4, 4), np.uint8)
    assert dice(a, b) == 1.0                  # empty vs empty
    a[0, :2] = 1                              # 2 pixels
    assert dice(a, b) == 0.0
    b[0, 1:4] = 1                             # 3 pixels, 1 shared
    assert dice(a, b) == 2 * 1 / (2 + 3)
    assert dice(b, b) == 1.0


def test_dice_batch_matches_per_image():
    rng = np.random.default_rng(0)
    prob = rng.random((5, 1, 8, 8))
    true = rng.random((5, 1, 8, 8)) > 0.5
    prob[4] = 0.0
    true[4] = False
    got = dice_batch(prob, true, 0.5)
    want = [dice(prob[i, 0] > 0.5, true[i, 0]) for i in range(5)]
    np.testing.assert_allclose(got, want)
    assert got[4] == 1.0
