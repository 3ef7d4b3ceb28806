"""Property tests (Hypothesis) of the Carvana RLE and of the submission validator.

The convention: the mask is flattened row by row (C order), and each run of ones is written as
``start length`` with 1-indexed starts, pairs in increasing order, runs apart. Checked here:
- ``rle.encode`` equals a plain reference encoder on any mask (all shapes 1xN and Nx1 included,
  all zeros -> "", all ones -> "1 H*W"), ``rle.decode`` inverts it, and only the C-order
  flatten matters (the same pixels as 1xN or Nx1 give the same string);
- every string ``encode`` makes passes ``validate.rle_problem`` and a whole submission of them
  passes ``check_submission``;
- every corruption of a valid string (odd count, non-increasing or zero start, overlapping runs,
  zero length, a run past H*W, a token that is not a plain number) is rejected, with the message
  for that problem, and the submission holding it fails on that line and no other.

Deterministic in CI: ``derandomize=True`` (a fixed seed) and no example database; a few hundred
examples in all, about a second or two.
"""
import csv
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline import rle
from pipeline.validate import check_submission, rle_problem, sizes_from

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def reference_runs(mask: np.ndarray) -> list[int]:
    """The Carvana convention spelled out pixel by pixel: an independent check of rle.runs."""
    flat = np.asarray(mask).reshape(-1) != 0
    out, i, n = [], 0, flat.size
    while i < n:
        if flat[i]:
            j = i
            while j < n and flat[j]:
                j += 1
            out += [i + 1, j - i]          # 1-indexed start, length
            i = j
        else:
            i += 1
    return out


@st.composite
def masks(draw) -> np.ndarray:
    """Binary masks of every kind the encoder must handle: 1xN, Nx1 and HxW shapes up to 1600
    pixels (25 64-bit words, so runs cross word boundaries), as noise, as long runs, or constant."""
    kind = draw(st.sampled_from(["row", "column", "grid"]))
    n = draw(st.integers(1, 300))
    shape = {"row": (1, n), "column": (n, 1)}.get(kind) or (draw(st.integers(1, 40)), draw(st.integers(1, 40)))
    size = shape[0] * shape[1]
    fill = draw(st.sampled_from(["noise", "runs", "zeros", "ones"]))
    if fill == "noise":
        return draw(arrays(np.uint8, shape, elements=st.integers(0, 1)))
    if fill == "zeros":
        return np.zeros(shape, np.uint8)
    if fill == "ones":
        return np.ones(shape, np.uint8)
    # Alternating runs of random lengths, starting with either value.
    lengths = draw(st.lists(st.integers(1, 130), min_size=1, max_size=20))
    value, flat = draw(st.integers(0, 1)), []
    for ln in lengths:
        flat += [value] * ln
        value ^= 1
    flat = (flat + [0] * size)[:size]
    return np.array(flat, np.uint8).reshape(shape)


@SETTINGS
@given(masks())
@example(np.zeros((1, 1), np.uint8))
@example(np.ones((1, 1), np.uint8))
@example(np.ones((1, 1918), np.uint8))
@example(np.ones((1280, 1), np.uint8))
@example(np.zeros((7, 9), np.uint8))
def test_rle_round_trip_matches_the_carvana_convention(mask):
    h, w = mask.shape
    code = rle.encode(mask)
    assert code == " ".join(map(str, reference_runs(mask)))
    assert np.array_equal(rle.decode(code, (h, w)), mask)
    assert rle_problem(code, h * w) is None
    # Only the row-major flatten matters.
    assert rle.encode(mask.reshape(1, -1)) == rle.encode(mask.reshape(-1, 1)) == code
    # Any nonzero value is car (bool, 0/255, float): the same string.
    assert rle.encode(mask.astype(bool)) == rle.encode(mask * 255) == rle.encode(mask.astype(np.float32)) == code
    if not mask.any():
        assert code == ""
    if mask.all():
        assert code == f"1 {h * w}"


@st.composite
def valid_runs(draw, min_runs: int = 0):
    """(H, W, [start, length, ...]): a valid RLE for an HxW image, 1-indexed, increasing, runs
    apart (the first may start at pixel 1, the last may end at pixel H*W)."""
    k = draw(st.integers(min_runs, 12))
    gaps = draw(st.lists(st.integers(1, 40), min_size=k, max_size=k))
    if gaps:
        gaps[0] -= 1                               # the first run may start at pixel 1
    lengths = draw(st.lists(st.integers(1, 80), min_size=k, max_size=k))
    h = draw(st.integers(1, 40))
    w = max(1, -(-(sum(gaps) + sum(lengths)) // h)) + draw(st.integers(0, 3))
    nums, end = [], 0                              # end: the last pixel so far (1-indexed)
    for gap, length in zip(gaps, lengths):
        nums += [end + gap + 1, length]
        end += gap + length
    return h, w, nums


BAD_TOKENS = ["-1", "1.5", "a", "", "1e3", "0x1", "+3", "\u0661", "NaN", "1,2", '"7"']
CORRUPTIONS = {
    "odd": "odd count of numbers",
    "start_zero": "is not positive (starts are 1-indexed)",
    "length_zero": "length 0 is not positive",
    "not_increasing": "not after previous start",
    "overlap": "overlaps the next run",
    "out_of_range": "beyond H*W",
    "not_a_number": "not space-separated non-negative integers",
    "spacing": "not space-separated non-negative integers",
}


def corrupt(nums: list[int], n: int, kind: str, data) -> str:
    """A string that breaks exactly one rule of the RLE ``nums`` (valid, >= 2 runs) for n pixels."""
    nums = list(nums)
    runs = len(nums) // 2
    k = data.draw(st.integers(0, runs - 1), label="run")
    if kind == "odd":
        nums.pop()
    elif kind == "start_zero":
        nums[0] = 0
    elif kind == "length_zero":
        nums[2 * k + 1] = 0
    elif kind == "not_increasing":
        k = max(k, 1)                   # run k starts at or before run k-1
        nums[2 * k] = data.draw(st.integers(1, nums[2 * k - 2]), label="start")
    elif kind == "overlap":
        k = min(k, runs - 2)            # run k reaches into run k+1
        nums[2 * k + 1] = nums[2 * k + 2] - nums[2 * k] + data.draw(st.integers(1, 5), label="extra")
    elif kind == "out_of_range":
        nums[-1] = n - nums[-2] + 1 + data.draw(st.integers(1, 5), label="extra")
    tokens = [str(v) for v in nums]
    if kind == "not_a_number":
        tokens[data.draw(st.integers(0, len(tokens) - 1), label="token")] = data.draw(st.sampled_from(BAD_TOKENS))
    if kind == "spacing":               # a leading, trailing or doubled space, or a tab
        how = data.draw(st.sampled_from(["lead", "trail", "double", "tab"]), label="spacing")
        s = " ".join(tokens)
        return {"lead": " " + s, "trail": s + " ", "double": s.replace(" ", "  ", 1),
                "tab": s.replace(" ", "\t", 1)}[how]
    return " ".join(tokens)


def _check_file(path: Path, rows: list[tuple[str, str]], h: int, w: int):
    with open(path, "w", newline="", encoding="utf-8") as f:      # csv quoting: '1,2' stays one field
        csv.writer(f).writerows([("img", "rle_mask"), *rows])
    return check_submission(path, [i for i, _ in rows], sizes_from((h, w)))


@SETTINGS
@given(masks(), masks())
def test_validator_accepts_every_encoded_mask(a, b):
    """Whole submissions of encoder output pass (images of different sizes: each row is checked
    against its own H*W)."""
    sizes = {"a.jpg": a.shape, "b.jpg": b.shape, "c.jpg": (3, 5)}
    codes = {"a.jpg": rle.encode(a), "b.jpg": rle.encode(b), "c.jpg": ""}
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "sub.csv"
        p.write_text("img,rle_mask\n" + "".join(f"{i},{c}\n" for i, c in codes.items()))
        rep = check_submission(p, list(codes), sizes_from(sizes))
    assert rep.ok, rep.summary()


@SETTINGS
@given(valid_runs(min_runs=2), st.sampled_from(sorted(CORRUPTIONS)), st.data())
def test_validator_rejects_every_corrupted_rle(case, kind, data):
    h, w, nums = case
    n = h * w
    good = " ".join(map(str, nums))
    assert rle_problem(good, n) is None
    assert np.count_nonzero(rle.decode(good, (h, w))) == sum(nums[1::2])   # a real mask
    bad = corrupt(nums, n, kind, data)
    msg = rle_problem(bad, n)
    assert msg is not None, f"{kind}: {bad!r} accepted"
    assert CORRUPTIONS[kind] in msg, (kind, bad, msg)
    with tempfile.TemporaryDirectory() as d:
        rep = _check_file(Path(d) / "sub.csv", [("a.jpg", good), ("b.jpg", bad), ("c.jpg", good)], h, w)
    assert not rep.ok and rep.n_problems == 1
    (problem,) = rep.problems
    assert problem.line == 3 and problem.img == "b.jpg" and problem.message.startswith("rle_mask: ")
