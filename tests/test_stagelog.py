"""Each stage's console output is also appended to <stage>.log beside its artifacts."""
from pipeline import cli, stagelog


def test_progress_redraws_leave_one_line():
    assert stagelog.clean("a\nbar 10%\rbar 50%\rbar 100%\nb\r\n") == "a\nbar 100%\nb\r\n"


def test_failed_stage_logs_its_error_in_the_fallback_place(tmp_path, capsys):
    args = [f"data.raw={tmp_path / 'nothing'}", f"data.cache={tmp_path / 'cache'}"]
    assert cli.main(["prepare", *args]) == 2
    log = (tmp_path / "cache" / "logs" / "prepare.log").read_text()
    assert log.startswith("=== ") and "python -m pipeline prepare" in log
    assert "failed: PipelineError" in log and "no such directory" in log
    assert "no such directory" in capsys.readouterr().err        # the console still gets it


def test_logs_append_per_run(tmp_path):
    args = [f"data.raw={tmp_path / 'raw'}", f"data.cache={tmp_path / 'cache'}", "synth.train_cars=1",
            "synth.test_cars=1", "synth.image_height=32", "synth.image_width=48", "synth.workers=1"]
    assert cli.main(["synth", *args]) == 0
    assert cli.main(["synth", *args]) == 0          # the second run finds the set and says so
    log = (tmp_path / "cache" / "logs" / "synth.log").read_text()
    assert log.count("=== ok") == 2 and "synth: wrote 16 train" in log and "already holds a dataset" in log
    assert not (tmp_path / "raw" / "synth.log").exists()
