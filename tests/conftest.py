"""Shared test set-up: offline hub, no albumentations update check, the shared data and raw sets, the zygote."""
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest  # noqa: E402

from _train_helpers import RAW_H, RAW_W  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip when this checkout has none beside it."""
    if not SHARED.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED


@pytest.fixture(scope="session")
def raw_base(tmp_path_factory) -> Path:
    """2 train cars (32 pairs: 2 folds) and 1 test car (16 images) at RAW_H x RAW_W, generated once
    per session. Never modified: a test that changes files takes its own copy (``raw``)."""
    from pipeline import synth
    return synth.generate(tmp_path_factory.mktemp("base") / "raw", train_cars=2, test_cars=1,
                          height=RAW_H, width=RAW_W, seed=3, workers=1)


@pytest.fixture
def raw(raw_base, tmp_path) -> Path:
    """This test's own copy of ``raw_base``."""
    import shutil
    return Path(shutil.copytree(raw_base, tmp_path / "raw"))


@pytest.fixture(scope="session")
def zygote(tmp_path_factory):
    """One pre-imported parent for the session's pipeline processes (tests/_stage_runner.py): each
    job is a fresh forked child, so no test sees another's; started on first use."""
    from _stage_runner import Zygote
    z = Zygote(tmp_path_factory.mktemp("zygote"))
    yield z
    z.close()
