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
    got = dice_batch(prob > 0.5, true)
    want = [dice(prob[i, 0] > 0.5, true[i, 0]) for i in range(5)]
    np.testing.assert_allclose(got, want)
    assert got[4] == 1.0


def test_every_dice_is_the_counts_formula():
    import torch
    from pipeline.metrics import counts, dice_from_counts
    rng = np.random.default_rng(1)
    pred, true = rng.random((6, 9, 7)) > 0.6, rng.random((6, 9, 7)) > 0.5
    pred[5] = true[5] = False
    per = [counts(p, t) for p, t in zip(pred, true)]
    want = dice_from_counts(*(np.array(c) for c in zip(*per)))
    assert [dice(p, t) for p, t in zip(pred, true)] == want.tolist()
    assert dice_batch(pred, true).tolist() == want.tolist() and want[5] == 1.0
    got = dice_from_counts(*(torch.tensor(c) for c in zip(*per)))
    assert got.dtype == torch.float64 and got.tolist() == want.tolist()
