"""The submission validator catches each listed defect and names its line."""
import gzip
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.validate import check_submission, parse_size, rle_problem, sizes_from

REPO = Path(__file__).resolve().parents[1]
IDS = [f"car_{k:02d}.jpg" for k in range(1, 6)]
GOOD = {"car_01.jpg": "1 5 10 3", "car_02.jpg": "", "car_03.jpg": "7 2", "car_04.jpg": "1 48",
        "car_05.jpg": "40 9"}
SIZE = sizes_from((6, 8))  # every image 8 wide, 6 high: 48 pixels


def write(tmp_path, rows, header="img,rle_mask", name="sub.csv"):
    p = tmp_path / name
    text = header + "\n" + "".join(f"{i},{r}\n" for i, r in rows)
    if name.endswith(".gz"):
        with gzip.open(p, "wt") as f:
            f.write(text)
    else:
        p.write_text(text)
    return p


def check(tmp_path, rows, **kw):
    return check_submission(write(tmp_path, rows, **kw), IDS, SIZE)


def test_valid_plain_and_gzip(tmp_path):
    rows = list(GOOD.items())
    for name in ("sub.csv", "sub.csv.gz"):
        rep = check(tmp_path, rows, name=name)
        assert rep.ok, rep.summary()
        assert rep.rows == 5


@pytest.mark.parametrize("rle,fragment", [
    ("1 2 3", "odd count"),
    ("1 2 x", "not space-separated"),
    ("1  2", "not space-separated"),
    ("-1 2", "not space-separated"),
    ("1.5 2", "not space-separated"),
    ("0 2", "not positive"),
    ("3 0", "length 0 is not positive"),
    ("10 2 5 2", "not after previous start"),
    ("10 2 10 2", "not after previous start"),
    ("1 5 5 2", "overlaps"),
    ("40 9", None),           # ends exactly at pixel 48
    ("40 10", "beyond H*W = 48"),
    ("49 1", "beyond H*W"),
    ("1 5 6 2", None),        # touching runs do not overlap
    ("99999999999999999999 1", "too large"),
])
def test_rle_rules(rle, fragment):
    msg = rle_problem(rle, 48)
    if fragment is None:
        assert msg is None
    else:
        assert msg is not None and fragment in msg, msg


def test_bad_rle_reported_with_line(tmp_path):
    rows = list(GOOD.items())
    rows[2] = ("car_03.jpg", "7 2 8 1")
    rep = check(tmp_path, rows)
    assert not rep.ok and rep.n_problems == 1
    p = rep.problems[0]
    assert (p.line, p.img) == (4, "car_03.jpg") and "overlaps" in p.message
    assert "line 4 (car_03.jpg)" in rep.summary()


def test_header(tmp_path):
    rep = check(tmp_path, list(GOOD.items()), header="id,rle")
    assert [p.line for p in rep.problems] == [1] and "header" in rep.problems[0].message


def problems(rep):
    return [(p.line, p.img, p.message) for p in rep.problems]


def test_missing_row(tmp_path):
    rows = [r for r in GOOD.items() if r[0] != "car_03.jpg"]
    rep = check(tmp_path, rows)
    # One problem: the rows after it are in order, not "out of order" or "expected id".
    assert problems(rep) == [(6, "", "1 id(s) of the sample missing: car_03.jpg (row 3)")]


def test_missing_rows_at_end_and_unknown_rows(tmp_path):
    rep = check(tmp_path, list(GOOD.items())[:1] + list(GOOD.items())[2:3])
    assert problems(rep) == [(4, "", "3 id(s) of the sample missing: car_02.jpg (row 2), car_04.jpg (row 4), "
                                     "car_05.jpg (row 5)")]
    rep = check(tmp_path, [])
    assert problems(rep) == [(2, "", "5 id(s) of the sample missing: car_01.jpg (row 1), car_02.jpg (row 2), "
                                     "car_03.jpg (row 3), ...")]
    rep = check(tmp_path, list(GOOD.items()) + [("car_06.jpg", "1 1")])
    assert problems(rep) == [(7, "car_06.jpg", "unknown id: not in the sample submission")]


def test_swapped_rows(tmp_path):
    rows = list(GOOD.items())
    rows[1], rows[2] = rows[2], rows[1]
    rep = check(tmp_path, rows)
    # The fewest rows to move: one (not a false "missing row" and a "duplicate").
    assert problems(rep) == [(3, "car_03.jpg", "out of order: row 2 holds the sample's row 3, "
                                               "which belongs between line 4 (car_02.jpg) and line 5 (car_04.jpg)")]
    rows = list(GOOD.items())
    rows = rows[1:] + rows[:1]                                      # the first row moved to the end
    assert problems(check(tmp_path, rows)) == [
        (6, "car_01.jpg", "out of order: row 5 holds the sample's row 1, which belongs before line 2 (car_02.jpg)")]
    rows = list(GOOD.items())
    rows = rows[-1:] + rows[:-1]                                    # the last row moved first
    assert problems(check(tmp_path, rows)) == [
        (2, "car_05.jpg", "out of order: row 1 holds the sample's row 5, which belongs after line 6 (car_04.jpg)")]


def test_duplicates_adjacent_and_not(tmp_path):
    rows = list(GOOD.items())
    rows.insert(2, rows[1])                                         # car_02 twice in a row
    assert problems(check(tmp_path, rows)) == [(4, "car_02.jpg", "duplicate of line 3 (row 2)")]
    rows = list(GOOD.items())
    rows[3] = rows[0]                                               # car_01 again in car_04's place
    assert problems(check(tmp_path, rows)) == [
        (5, "car_01.jpg", "duplicate of line 2 (row 1)"),
        (7, "", "1 id(s) of the sample missing: car_04.jpg (row 4)")]


def test_unknown_id_in_place_of_a_row(tmp_path):
    rows = list(GOOD.items())
    rows[2] = ("car_99.jpg", "7 2")
    assert problems(check(tmp_path, rows)) == [
        (4, "car_99.jpg", "unknown id: not in the sample submission"),
        (7, "", "1 id(s) of the sample missing: car_03.jpg (row 3)")]


def test_every_kind_at_once_listed_by_line_with_the_cap(tmp_path):
    rows = list(GOOD.items())
    rows = [rows[1], rows[0], ("car_01.jpg", ""), ("zz.jpg", ""), rows[3]]   # car_03, car_05 missing
    rep = check(tmp_path, rows)
    assert problems(rep) == [
        (2, "car_02.jpg", "out of order: row 1 holds the sample's row 2, which belongs between line 3 (car_01.jpg) "
                          "and line 6 (car_04.jpg)"),
        (4, "car_01.jpg", "duplicate of line 3 (row 2)"),
        (5, "zz.jpg", "unknown id: not in the sample submission"),
        (7, "", "2 id(s) of the sample missing: car_03.jpg (row 3), car_05.jpg (row 5)")]
    capped = check_submission(write(tmp_path, rows), IDS, SIZE, max_problems=2)
    assert capped.n_problems == 4 and len(capped.problems) == 2
    assert [p.line for p in capped.problems] == [2, 7]                # the missing summary is always listed
    assert "... and 2 more" in capped.summary()


def test_out_of_order_is_the_fewest_rows_to_move():
    from pipeline.validate import out_of_order
    assert out_of_order([0, 1, 2]) == []
    assert out_of_order([0, 2, 1, 3]) == [1]
    assert out_of_order([9, 0, 1, 2, 3]) == [0]                     # the last row moved first: one row, not all
    assert out_of_order([1, 2, 3, 0]) == [3]
    assert len(out_of_order([4, 3, 2, 1, 0])) == 4


def test_wrong_field_count(tmp_path):
    p = tmp_path / "sub.csv"
    p.write_text("img,rle_mask\n" + "".join(f"{i},{r}\n" for i, r in GOOD.items()).replace("car_02.jpg,", "car_02.jpg"))
    rep = check_submission(p, IDS, SIZE)
    assert rep.problems[0].line == 3 and "2 fields" in rep.problems[0].message


def test_per_image_sizes(tmp_path):
    rows = list(GOOD.items())
    sizes = {i: (6, 8) for i in IDS} | {"car_05.jpg": (4, 8)}  # 32 pixels: "40 9" falls outside
    rep = check_submission(write(tmp_path, rows), IDS, sizes_from(sizes))
    assert [p.line for p in rep.problems] == [6] and "(image 8x4)" in rep.problems[0].message


def test_reports_first_problems_but_counts_all(tmp_path):
    rows = [(i, "1 2 3") for i in IDS]
    rep = check_submission(write(tmp_path, rows), IDS, SIZE, max_problems=2)
    assert rep.n_problems == 5 and len(rep.problems) == 2 and "3 more" in rep.summary()


def test_parse_size_is_w_by_h():
    assert parse_size("1918x1280") == (1280, 1918)


def test_cli_exit_codes(tmp_path):
    sample = tmp_path / "sample_submission.csv"
    sample.write_text("img,rle_mask\n" + "".join(f"{i},1 1\n" for i in IDS))
    good = write(tmp_path, list(GOOD.items()), name="good.csv")
    bad = write(tmp_path, [(i, "0 1") for i in IDS], name="bad.csv")
    cmd = [sys.executable, str(REPO / "scripts" / "validate.py"), "--sample", str(sample), "--size", "8x6"]
    ok = subprocess.run(cmd + [str(good)], capture_output=True, text=True)
    assert ok.returncode == 0 and "OK (5 rows)" in ok.stdout
    ko = subprocess.run(cmd + [str(bad)], capture_output=True, text=True)
    assert ko.returncode == 1 and "line 2 (car_01.jpg)" in ko.stdout
    missing = subprocess.run(cmd + [str(tmp_path / "nope.csv")], capture_output=True, text=True)
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_very_long_rle_row(tmp_path):
    """A ragged 1918x1280 mask: 20k runs, ~300 KB in one field, past csv's default 128 KiB limit."""
    rle = " ".join(f"{s} 3" for s in range(1, 1 + 100 * 20_000, 100))
    assert len(rle) > 131072
    rows = list(GOOD.items())
    rows[0] = ("car_01.jpg", rle)
    sizes = {i: (6, 8) for i in IDS} | {"car_01.jpg": (1280, 1918)}
    rep = check_submission(write(tmp_path, rows), IDS, sizes_from(sizes))
    assert rep.ok, rep.summary()


def test_sizes_from_jpeg_headers_and_index(tmp_path, capsys):
    """Without --size: each image's H, W from the test JPEG beside the sample, or from test_index.csv."""
    import cv2
    import numpy as np

    from pipeline.validate import main
    (tmp_path / "test").mkdir()
    for i in IDS:
        cv2.imwrite(str(tmp_path / "test" / i), np.zeros((6, 8, 3), np.uint8))  # 8 wide, 6 high
    sample = tmp_path / "sample_submission.csv"
    sample.write_text("img,rle_mask\n" + "".join(f"{i},1 1\n" for i in IDS))
    good = write(tmp_path, list(GOOD.items()), name="good.csv")
    assert main([str(good), "--sample", str(sample)]) == 0
    cv2.imwrite(str(tmp_path / "test" / "car_05.jpg"), np.zeros((4, 8, 3), np.uint8))  # now 32 pixels
    assert main([str(good), "--sample", str(sample)]) == 1
    assert "line 6 (car_05.jpg)" in capsys.readouterr().out
    index = tmp_path / "test_index.csv"
    index.write_text("img,id,orig_height,orig_width\n" + "".join(f"{i},{i[:-4]},6,8\n" for i in IDS))
    assert main([str(good), "--sample", str(sample), "--index", str(index)]) == 0


def test_test_dir_option_reads_sizes_from_that_folder(tmp_path, capsys):
    """data.test_dir=test_hq: sizes come from <raw>/test_hq, not from a test/ of another size."""
    import cv2
    import numpy as np

    from pipeline.validate import main
    for name, (h, w) in (("test", (4, 8)), ("test_hq", (6, 8))):    # test/ would reject "40 9" (32 px)
        (tmp_path / name).mkdir()
        for i in IDS:
            cv2.imwrite(str(tmp_path / name / i), np.zeros((h, w, 3), np.uint8))
    sample = tmp_path / "sample_submission.csv"
    sample.write_text("img,rle_mask\n" + "".join(f"{i},1 1\n" for i in IDS))
    good = write(tmp_path, list(GOOD.items()), name="good.csv")
    assert main([str(good), "--sample", str(sample)]) == 1            # default: test/
    assert main([str(good), "--sample", str(sample), "--test-dir", "test_hq"]) == 0
    capsys.readouterr()
    assert main([str(good), "--sample", str(sample), "--test-dir", "nope"]) == 2
    assert "nope: no test image folder" in capsys.readouterr().err
