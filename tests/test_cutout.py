"""make cutout: an export folder run by onnxruntime alone on photos of any size: RGBA cutouts at the
photo's own size, EXIF orientation applied, bad files named one line each, no torch imported."""
import json
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from pipeline import cache, cutout, export, onnxrun
from pipeline.models import build_model

REPO = Path(__file__).resolve().parents[1]
H, W = 64, 96
GOOD = {"car.jpg": (90, 140), "big.jpg": (600, 900), "shot.png": (70, 50), "gray.jpg": (80, 120),
        "turned.jpg": (100, 60)}            # name -> the (h, w) a viewer shows (turned.jpg: EXIF 6, stored 60x100)
BAD = {"notes.jpg": "not_image", "cut.jpg": "truncated", "bomb.png": "too_large", "folder.jpg": "unreadable"}


def _photo(h, w, seed):
    """A bright, lopsided blob on a textured background: a model's output depends on where it is."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 90, (h, w, 3), dtype=np.uint8)
    cv2.ellipse(img, (int(w * 0.4), int(h * 0.55)), (int(w * 0.3), int(h * 0.2)), 20, 0, 360, (230, 60, 40), -1)
    cv2.rectangle(img, (int(w * 0.6), int(h * 0.1)), (int(w * 0.9), int(h * 0.3)), (40, 200, 220), -1)
    return img


def _bomb_png() -> bytes:
    """A valid PNG header claiming 30000 x 30000 pixels (900 MP) and no pixel data to speak of."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Unet with random weights in a one-fold run folder, exported; the card's threshold set
    to the median probability on a probe photo, so the masks are about half car, not empty."""
    root = tmp_path_factory.mktemp("cutout")
    fold = root / "run" / "k1" / "fold0"
    fold.mkdir(parents=True)
    torch.manual_seed(0)
    kw = {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}
    net = build_model("Unet", "resnet18", "none", **kw)
    torch.save({"model": net.state_dict(), "arch": "Unet", "encoder": "resnet18", "height": H, "width": W,
                "model_kwargs": kw, "config": {"prepare": {"fit": "stretch"}}, "train_key": "k1", "epoch": 1,
                "best_score": 0.5}, fold / "best.pt")
    cache.write_manifest(fold, stage="train", key="k1", params={}, inputs={"prepare": "none"}, outputs={})
    out = export.export(root / "run" / "k1", root / "exports" / "k1", tta="hflip,vflip")
    assert torch.is_grad_enabled()               # the export leaves the caller's grad mode alone
    m = onnxrun.load_model(out)
    probe = cutout.Photo("probe", _photo(90, 140, 7), _photo(90, 140, 7), {"scaled_height": H, "scaled_width": W,
                                                                          "pad_top": 0, "pad_left": 0})
    card = json.loads((out / "model.json").read_text())
    x = onnxrun.model_input(m, probe.small, probe.geom)
    card["threshold"] = {"value": float(np.median(onnxrun.prob255(m, x))) / 255,
                         "source": "test: median on a probe"}
    (out / "model.json").write_text(json.dumps(card))
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    for i, (name, (h, w)) in enumerate(GOOD.items()):
        if name == "turned.jpg":       # stored 60x100 with EXIF orientation 6: shown 100 tall, 60 wide
            exif = Image.Exif()
            exif[0x0112] = 6
            Image.fromarray(_photo(w, h, i)).save(d / name, quality=92, exif=exif)
        elif name == "gray.jpg":
            Image.fromarray(_photo(h, w, i)[..., 0]).save(d / name, quality=92)
        elif name == "shot.png":
            rgba = np.dstack([_photo(h, w, i), np.full((h, w), 200, np.uint8)])
            Image.fromarray(rgba, "RGBA").save(d / name)
        else:
            Image.fromarray(_photo(h, w, i)).save(d / name, quality=92)
    (d / "notes.jpg").write_text("not a photo\n")
    data = (d / "big.jpg").read_bytes()
    (d / "cut.jpg").write_bytes(data[: len(data) // 2])
    (d / "bomb.png").write_bytes(_bomb_png())
    (d / "folder.jpg").mkdir()
    (d / "readme.txt").write_text("left aside")
    return d


def _pil_upright(path) -> np.ndarray:
    return np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))


def test_cutouts_sizes_and_bad_files(model_dir, photos, tmp_path, capsys):
    rc = cutout.main(["--in", str(photos), "--out", str(tmp_path), "--model", str(model_dir), "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 1                                       # something was refused
    refused = [ln for ln in cap.err.splitlines() if ln.startswith("cutout: refused ")]
    assert len(refused) == len(BAD)
    for name, kind in BAD.items():
        (line,) = [ln for ln in refused if ln.startswith(f"cutout: refused {name}: ")]
        assert f": {kind}: " in line, line
    assert f"cutout: {len(GOOD)} done, {len(BAD)} refused" in cap.out and "1 other file(s) left aside" in cap.out
    for name, (h, w) in GOOD.items():
        stem = Path(name).stem
        rgba = cv2.imread(str(tmp_path / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(tmp_path / f"{stem}_mask.png"), cv2.IMREAD_UNCHANGED)
        assert rgba.shape == (h, w, 4) and mask.shape == (h, w), name
        assert set(np.unique(mask)) <= {0, 255} and np.array_equal(rgba[..., 3], mask)
        assert 0.02 < (mask > 0).mean() < 0.98, name     # neither empty nor full
        rgb = cv2.cvtColor(rgba[..., :3], cv2.COLOR_BGR2RGB)
        # the photo's own pixels (PIL's decode: JPEG decoders may differ by a level)
        assert np.abs(rgb.astype(int) - _pil_upright(photos / name)).max() <= (0 if name.endswith(".png") else 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{Path(n).stem}.png" for n in GOOD] + [f"{Path(n).stem}_mask.png" for n in GOOD])


def test_exif_orientation_is_applied(model_dir, photos, tmp_path):
    """turned.jpg (stored 60x100, EXIF orientation 6) comes out as a viewer shows it, 100x60, with the
    mask of the same pixels saved upright without a tag."""
    shown = _pil_upright(photos / "turned.jpg")
    assert shown.shape[:2] == (100, 60) and np.asarray(Image.open(photos / "turned.jpg")).shape[:2] == (60, 100)
    (tmp_path / "in").mkdir()
    shutil.copy(photos / "turned.jpg", tmp_path / "in" / "turned.jpg")
    Image.fromarray(shown).save(tmp_path / "in" / "upright.png")
    s = cutout.run(tmp_path / "in", tmp_path / "out", model_dir, progress=False)
    assert (s.done, s.refused) == (2, 0)
    a = cv2.imread(str(tmp_path / "out" / "turned_mask.png"), cv2.IMREAD_UNCHANGED) > 0
    b = cv2.imread(str(tmp_path / "out" / "upright_mask.png"), cv2.IMREAD_UNCHANGED) > 0
    assert a.shape == b.shape == (100, 60)
    assert (a != b).mean() < 0.002                       # the same picture (decoders may differ by a level)
    stored = cutout.read_photo(photos / "turned.jpg", H, W, "stretch")
    assert stored.orientation == 6 and stored.rgb.shape == (100, 60, 3)


def test_composite_over_a_colour(model_dir, photos, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    shutil.copy(photos / "car.jpg", tmp_path / "in")
    assert cutout.main(["--in", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--model", str(model_dir),
                        "--bg", "#ffffff", "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["car.jpg", "car_mask.png"]
    comp = cv2.imread(str(tmp_path / "out" / "car.jpg"))
    mask = cv2.imread(str(tmp_path / "out" / "car_mask.png"), cv2.IMREAD_UNCHANGED) > 0
    assert comp.shape == (90, 140, 3)
    inner = cv2.erode((~mask).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0     # away from JPEG ringing
    assert inner.any() and comp[inner].mean() > 245
    capsys.readouterr()
    assert cutout.main(["--in", str(tmp_path / "in"), "--out", str(tmp_path / "o2"), "--model", str(model_dir),
                        "--bg", "notacolour"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: BG=notacolour: not a colour")


def test_refusals_of_the_command(model_dir, photos, tmp_path, capsys):
    """A card with a view the runner does not implement, a folder that is no export, OUT = IN, and two
    photos that would write the same cutout: one line each."""
    bad = tmp_path / "scaled"
    shutil.copytree(model_dir, bad)
    card = json.loads((bad / "model.json").read_text())
    card["tta"] = ["none", "scale0.75"]
    (bad / "model.json").write_text(json.dumps(card))
    for model, want in ((bad, "TTA view(s) scale0.75 are not supported by the cutout runner"),
                        (tmp_path, "not an export folder")):
        assert cutout.main(["--in", str(photos), "--out", str(tmp_path / "o"), "--model", str(model)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and want in err[0], err
    (tmp_path / "in").mkdir()
    shutil.copy(photos / "car.jpg", tmp_path / "in" / "a.jpg")
    Image.open(photos / "car.jpg").save(tmp_path / "in" / "a.png")
    assert cutout.main(["--in", str(tmp_path / "in"), "--out", str(tmp_path / "in"), "--model", str(model_dir)]) == 2
    assert "is the input folder" in capsys.readouterr().err
    lines = []
    s = cutout.run(tmp_path / "in", tmp_path / "o3", model_dir, progress=False, log=lines.append)
    assert (s.done, s.refused) == (1, 1) and len(lines) == 1 and "name_clash" in lines[0]


def test_pad_geometry_keeps_each_photo_size(model_dir, photos, tmp_path):
    """fit=pad in the card: a tall and a wide photo each come back at their own size."""
    pad = tmp_path / "pad"
    shutil.copytree(model_dir, pad)
    card = json.loads((pad / "model.json").read_text())
    card["geometry"]["fit"] = "pad"
    (pad / "model.json").write_text(json.dumps(card))
    (tmp_path / "in").mkdir()
    Image.fromarray(_photo(200, 50, 1)).save(tmp_path / "in" / "tall.png")
    Image.fromarray(_photo(30, 300, 2)).save(tmp_path / "in" / "wide.png")
    s = cutout.run(tmp_path / "in", tmp_path / "out", pad, progress=False)
    assert (s.done, s.refused) == (2, 0)
    assert cv2.imread(str(tmp_path / "out" / "tall.png"), cv2.IMREAD_UNCHANGED).shape == (200, 50, 4)
    assert cv2.imread(str(tmp_path / "out" / "wide_mask.png"), cv2.IMREAD_UNCHANGED).shape == (30, 300)


def test_the_card_constants_agree_with_export():
    """export writes what cutout reads: two stages never import each other, so both take the card's
    name, format and the runner's views from the block pipeline.onnxrun (the default folder from
    ``Graph.export_dir``: tests/test_export.py)."""
    assert (export.CARD, export.CARD_FORMAT) == (onnxrun.CARD, onnxrun.CARD_FORMAT) == ("model.json",
                                                                                      "carvana-export-1")
    assert tuple(export.VIEWS) == tuple(onnxrun.VIEWS) == ("none", "hflip", "vflip", "hvflip")
    assert cutout.onnxrun is onnxrun


def test_runs_without_torch(model_dir, photos, tmp_path):
    """pipeline.cutout and everything it imports are torch-free, and a run starts in seconds."""
    code = ("import sys, time; t = time.time(); from pipeline import cutout; "
            f"rc = cutout.main(['--in', {str(photos)!r}, '--out', {str(tmp_path)!r}, '--model', {str(model_dir)!r}]); "
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')); "
            "print('RESULT', rc, len(bad), round(time.time() - t, 2))")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    wall = time.time() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    _, rc, n_torch, seconds = line.split()
    print(f"\ncutout in a fresh interpreter: {seconds} s for {len(GOOD) + len(BAD)} files, {wall:.1f} s wall")
    assert rc == "1" and n_torch == "0"
    assert wall < 30
    assert (tmp_path / "car.png").is_file()
