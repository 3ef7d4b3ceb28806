import pytest

from pipeline import cache, config
from pipeline.errors import ConfigError


def test_defaults_yaml_then_overrides(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("train:\n  epochs: 7\n  lr: 0.01\nprepare:\n  height: 64\n")
    cfg = config.load(f, ["epochs=3", "train.batch_size=4", "channels_last=false"])
    assert cfg.train.epochs == 3            # the override wins over the YAML
    assert cfg.train.lr == 0.01             # the YAML wins over the default
    assert cfg.prepare.height == 64
    assert cfg.train.batch_size == 4
    assert cfg.train.channels_last is False
    assert cfg.prepare.width == config.PrepareConfig().width


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="unknown config key 'epoch'"):
        config.load(None, ["epoch=3"])
    with pytest.raises(ConfigError, match="nosuch"):
        config.load(None, {"train.nosuch": 1})


def test_ambiguous_short_key_lists_candidates():
    # "seed" lives in synth, prepare and train.
    with pytest.raises(ConfigError, match="ambiguous.*prepare.seed.*train.seed"):
        config.load(None, ["seed=1"])
    assert config.load(None, ["train.seed=1"]).train.seed == 1


@pytest.mark.parametrize("override", ["epochs=three", "epochs=1.5", "lr=fast", "channels_last=maybe"])
def test_type_checked(override):
    with pytest.raises(ConfigError, match="expects"):
        config.load(None, [override])


def test_sizes_must_fit_the_encoder_stride():
    with pytest.raises(ConfigError, match="multiple of 32"):
        config.load(None, ["height=100"])


def test_yaml_syntax_error_and_missing_file_name_the_file(tmp_path):
    """A YAML syntax error names the file; a missing file says so (its own name: a duplicate would be shadowed)."""
    f = tmp_path / "bad.yaml"
    f.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:2:1: not valid YAML: "):
        config.load(f)
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "missing.yaml")


def test_stable_hash_ignores_key_order():
    assert cache.stable_hash({"a": 1, "b": 2}) == cache.stable_hash({"b": 2, "a": 1})
    assert cache.stable_hash({"a": 1}) != cache.stable_hash({"a": 2})


def test_cli_reports_config_errors_without_traceback(capsys):
    from pipeline.cli import main
    assert main(["prepare", "epoch=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'epoch'" in err and "Traceback" not in err


def test_yaml_errors_name_the_file(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"exp\.yaml: unknown config key 'train\.epoch'"):
        config.load(f)
    f.write_text("train: 3\n")
    with pytest.raises(ConfigError, match=r"exp\.yaml: section 'train' must be a mapping"):
        config.load(f)


@pytest.mark.parametrize("override, key", [
    ("train.fold=-4", "train.fold"), ("synth.image_height=0", "synth.image_height"),
    ("synth.train_cars=-1", "synth.train_cars"), ("train.batch_size=0", "train.batch_size"),
    ("predict.max_forward=-1", "predict.max_forward")])
def test_out_of_range_values_are_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.load(None, [override])


def test_no_test_module_defines_a_test_twice():
    """A second ``def test_x`` in one module silently replaces the first, which then never runs
    (this file had one): every module-level and class-level test name must be unique."""
    import ast
    from pathlib import Path
    dupes = []
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for scope in [tree] + [n for n in tree.body if isinstance(n, ast.ClassDef)]:
            seen = set()
            for node in scope.body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
                    if node.name in seen:
                        dupes.append(f"{path.name}:{node.lineno} {node.name}")
                    seen.add(node.name)
    assert not dupes, f"tests defined twice (the first never runs): {dupes}"


def test_every_shipped_config_and_accuracy_variant_validates(tmp_path):
    """The recipes users run and the benchmark rows that reproduce README numbers are configs
    too: each must load and pass validation (e.g. a crop no larger than the prepared images)."""
    import importlib.util
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    shipped = sorted((repo / "configs").glob("*.yaml"))
    assert {p.name for p in shipped} >= {"default.yaml", "carvana512.yaml", "carvana512-best.yaml", "kaggle.yaml"}
    for path in shipped:
        config.check(config.load(path))
    spec = importlib.util.spec_from_file_location("bench_accuracy", repo / "benchmarks" / "bench_accuracy.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for name, (path, overrides, _) in bench.VARIANTS.items():
        # a pseudo-labelling row names its teacher (a config file or a variant, written seeded per row)
        overrides = bench.with_teachers(overrides, 0, str(tmp_path))
        try:
            config.check(config.load(repo / path, overrides))
        except ConfigError as e:
            raise AssertionError(f"bench_accuracy variant {name}: {e}") from None


def test_the_config_names_are_the_registries_names():
    """config.load checks names torch-free; the registries that build them are the same lists."""
    from pipeline import augment, losses, tta
    from pipeline.train import optim
    assert set(config.SCHEDULERS) == set(optim.SCHEDULES)
    assert set(config.FINAL_LOSSES) == {""} | set(losses.FINAL_LOSSES)
    assert set(augment.PRESETS["strong"]) <= set(augment.COMPONENTS)
    assert set(tta.FLIPS) == {"none", "hflip", "vflip", "hvflip"}


@pytest.mark.parametrize("override, message", [
    ("epoch=3", "unknown config key 'epoch' (did you mean 'epochs'?)"),
    ("train.scheduler=cosin", "train.scheduler='cosin' (did you mean 'cosine'?)"),
    ("predict.tta=hflp", "predict.tta: unknown transform 'hflp' (did you mean 'hflip'?)"),
    ("train.augment=ssr,hfip", "train.augment: unknown ['hfip'] (did you mean 'hflip'?)"),
    ("train.progressive=250:1", "train.progressive='250:1'"),
    ("predict.folds=9", "predict.folds='9': folds must be in 0..4"),
    ("predict.shard=3/2", "predict.shard='3/2'"),
    ("train.decoder_channels=a,b", "decoder_channels='a,b'"),
])
def test_every_spec_is_checked_at_load_with_the_key_named(override, message):
    with pytest.raises(ConfigError) as e:
        config.load(None, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_spec_is_parsed_once_into_a_typed_value():
    cfg = config.load(None, ["predict.tta=hflip,scale0.75", "train.progressive=c64:1", "epochs=2",
                             "train.augment=basic"])
    assert [t.name for t in cfg.spec("predict.tta")] == ["none", "hflip", "scale0.75"]
    assert cfg.spec("predict.tta") is cfg.spec("predict.tta")          # cached: parsed once per text
    assert cfg.spec("train.progressive") == ((64, 64, True, 1),)
    assert cfg.spec("train.augment") == ("hflip", "ssr", "bc")
    assert cfg.spec("predict.folds") is None and cfg.spec("predict.shard") == (0, 1)
    assert set(config.SPECS) == {"train.progressive", "train.decoder_channels", "train.augment", "predict.tta",
                                 "predict.folds", "predict.shard", "submit.runs", "submit.weights", "train.pseudo"}
    assert cfg.spec("train.pseudo") is None


def test_spec_parsers_are_torch_free():
    """load() parses every spec: none of their modules may pull torch into `make config` or prepare."""
    import subprocess
    import sys
    code = ("import sys; from pipeline import config; config.load(None, {}); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=config.PROJECT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
