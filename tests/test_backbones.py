"""Backbone interface, weight loading and its errors, and the efficientnet-lite ImageNet weights on real images."""
import urllib.error

import pytest
import torch

from pipeline.backbones import BACKBONES, WeightsError, build_backbone, feature_trunk, vgg16_fc_layers
from pipeline.cam import extract_crops
from pipeline.imageio import read_image
from pipeline.voc import parse_annotation


@pytest.fixture(scope="module")
def nets():
    return {n: build_backbone(n, 5, "random").eval() for n in BACKBONES}


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKBONES)
def test_interface_split_and_layer_shapes(nets, name):
    net = nets[name]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = net(x)
        assert y.shape == (2, 5) and net.num_classes == 5
        assert net.input_size == 224 and net.default_cam_layer in net.cam_layers
        for layer in net.cam_layers:
            info = net.layers[layer]
            if info.sub:  # an activation inside a body module: hooked, not a cut point
                seen = []
                handle = net.layer_module(layer).register_forward_hook(lambda m, i, o: seen.append(o.clone()))
                assert torch.equal(net(x), y)
                handle.remove()
                a = seen[0]
                with pytest.raises(ValueError, match="not a cut point"):
                    net.split(layer)
            else:
                lower, upper = net.split(layer)
                a = lower(x)
                assert torch.equal(upper(a), y), layer
                assert net.layer_module(layer) is lower[-1]
            assert a.shape == (2, info.channels, 64 // info.stride, 64 // info.stride), layer
    with pytest.raises(ValueError, match="no layer 'conv9'"):
        net.split("conv9")


def test_cam_layers_and_normalisation(nets):
    vgg = nets["vgg16"]
    assert vgg.cam_layers == ("conv4_3", "conv5_1", "conv5_2", "conv5_3") and vgg.default_cam_layer == "conv5_2"
    # conv5_2's activation is the output of its ReLU
    assert isinstance(vgg.layer_module("conv5_2"), torch.nn.ReLU)
    assert vgg.mean == pytest.approx((0.485, 0.456, 0.406)) and vgg.std == pytest.approx((0.229, 0.224, 0.225))
    eff = nets["efficientnet_lite0"]
    assert eff.mean == (0.5, 0.5, 0.5) and eff.std == (0.5, 0.5, 0.5)
    x = torch.tensor([0.0, 127.5, 255.0]).view(1, 3, 1, 1)
    assert eff.normalize(x).flatten().tolist() == [-1.0, 0.0, 1.0]


def test_stage5_expand_is_the_non_negative_stride16_expansion(nets):
    """stage5_expand (a default fused layer, tasks.defaults.TUNED.cam_layers) is the ReLU6 output of stage5's
    first 1x1 expansion: inside the stage5 block, stride 16, non-negative, unlike the linear stage outputs."""
    from tasks.defaults import TUNED

    eff = nets["efficientnet_lite0"]
    assert eff.layer_module("stage5_expand") is eff.body.stage5[0].bn1
    assert eff.layers["stage5_expand"] == ("stage5", 672, 16, "0.bn1")
    acts = {}
    hooks = [eff.layer_module(k).register_forward_hook(lambda m, i, o, k=k: acts.__setitem__(k, o.clone()))
             for k in ("stage5_expand", "stage5")]
    with torch.no_grad():
        eff(torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1)))
    for h in hooks:
        h.remove()
    assert acts["stage5_expand"].shape == (2, 672, 14, 14) and acts["stage5_expand"].min() >= 0
    assert acts["stage5"].shape == (2, 192, 7, 7) and acts["stage5"].min() < 0
    assert TUNED.cam_layers["efficientnet_lite0"] == ("stage5_expand", "stage6")
    assert TUNED.cam_layers["vgg16"] == ("conv5_2",)
    assert set(TUNED.cam_layers) == set(BACKBONES)
    for name, layers in TUNED.cam_layers.items():
        assert set(layers) <= set(nets[name].cam_layers), name


def test_parameter_groups_partition_the_model(nets):
    for net in nets.values():
        head = {id(p) for p in net.head_parameters()}
        body = {id(p) for p in net.backbone_parameters()}
        assert head and body and not head & body
        assert head | body == {id(p) for p in net.parameters()}
        assert sum(p.numel() for p in net.head_parameters()) == net.head.in_features * 5 + 5


def test_head_init_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_backbone("efficientnet_lite0", 4, "random", seed=1)
    after = torch.rand(1)
    assert torch.equal(before, after)
    b = build_backbone("efficientnet_lite0", 4, "random", seed=1)
    c = build_backbone("efficientnet_lite0", 4, "random", seed=2)
    assert torch.equal(a.head.weight, b.head.weight) and not torch.equal(a.head.weight, c.head.weight)
    assert torch.equal(a.body.stem[0].weight, b.body.stem[0].weight)
    assert float(a.head.weight.detach().std()) == pytest.approx(0.01, rel=0.1) and not a.head.bias.any()


def test_weights_errors_say_how_to_fix(tmp_path, monkeypatch):
    with pytest.raises(WeightsError, match="missing.pth: weights file not found"):
        build_backbone("efficientnet_lite0", 3, tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(WeightsError, match="bad.pth: not a readable torch weights file"):
        build_backbone("vgg16", 3, bad)
    wrong = tmp_path / "wrong.pth"
    torch.save({"a": torch.zeros(3)}, wrong)
    with pytest.raises(WeightsError, match="1 tensors.*not weights of this architecture"):
        build_backbone("efficientnet_lite0", 3, wrong)

    import torchvision

    def no_network(*a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.models.VGG16_Weights.IMAGENET1K_V1.__class__, "get_state_dict",
                        lambda self, *a, **k: no_network())
    with pytest.raises(WeightsError, match=r"(?s)vgg16-397923af.pth.*URLError.*Provide them by downloading"):
        build_backbone("vgg16", 3, "imagenet")
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("resnet50", 3)


def test_local_weights_file_round_trip_and_shape_check(tmp_path):
    import timm

    src = timm.create_model("efficientnet_lite0")
    with torch.no_grad():
        for p in src.parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    path = tmp_path / "timm_layout.pth"
    torch.save({"model": src.state_dict()}, path)  # checkpoint-dict form, timm key names
    net = build_backbone("efficientnet_lite0", 3, path, keep_imagenet_head=True).eval()
    assert torch.equal(net.body.stem[0].weight, src.conv_stem.weight)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net.imagenet_logits(x), src.eval()(x), atol=1e-5)
    # same tensors under other names but one shape changed: refused, naming the tensor
    state = {f"t{i}": v for i, v in enumerate(src.state_dict().values())}
    state["t0"] = torch.zeros(8, 3, 3, 3)
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"tensor t0 has shape \(8, 3, 3, 3\)"):
        build_backbone("efficientnet_lite0", 3, path)
    with pytest.raises(RuntimeError, match="keep_imagenet_head"):
        build_backbone("efficientnet_lite0", 3, "random").imagenet_logits(x)


@pytest.mark.slow
def test_detector_pieces():
    trunk = feature_trunk("vgg16", "random")
    assert (trunk.out_channels, trunk.stride) == (512, 16)
    with torch.no_grad():
        assert trunk.module(torch.zeros(1, 3, 64, 96)).shape == (1, 512, 4, 6)
    fc, n = vgg16_fc_layers("random")
    with torch.no_grad():
        assert n == 4096 and fc.eval()(torch.zeros(2, 512, 7, 7)).shape == (2, 4096)
    eff = feature_trunk("efficientnet_lite0", "random")
    assert (eff.out_channels, eff.stride) == (1280, 32)


# ImageNet class index ranges (torchvision / timm order)
DOG = range(151, 269)
DOMESTIC_CAT = range(281, 286)


def test_efficientnet_lite_variants_layers():
    """lite1 has lite0's widths (deeper stages), lite2 wider ones; the layer table follows the built network."""
    widths = {"efficientnet_lite1": (40, 80, 112, 192, 320), "efficientnet_lite2": (48, 88, 120, 208, 352)}
    for name, chans in widths.items():
        net = build_backbone(name, 3, "random")
        assert net.name == name and net.default_cam_layer == "stage6"
        assert tuple(net.layers[f"stage{i}"].channels for i in range(2, 7)) == chans
        assert net.layers["conv_head"].channels == net.head.in_features == 1280


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_efficientnet_lite_imagenet_weights_classify_real_images(sample_root, name):
    """The shipped weights, loaded in order into timm's architecture, recognise VOC test dogs and cats."""
    net = build_backbone(name, 20, "imagenet", keep_imagenet_head=True).eval()
    voc = sample_root / "VOC2007"
    crops, wanted = [], []
    for image_id in (voc / "ImageSets" / "Main" / "test.txt").read_text().split():
        ann = parse_annotation(voc / "Annotations" / f"{image_id}.xml")
        for o in ann.objects:
            if o.cls in ("dog", "cat") and (o.x2 - o.x1) * (o.y2 - o.y1) > 100 * 100:
                img = read_image(voc / "JPEGImages" / f"{image_id}.jpg")
                crops.append(extract_crops(img, [[o.x1, o.y1, o.x2, o.y2]], 224, net.mean, net.std))
                wanted.append(o.cls)
    assert wanted.count("dog") >= 2 and wanted.count("cat") >= 1, wanted
    with torch.no_grad():
        top = net.imagenet_logits(torch.cat(crops)).argmax(1).tolist()
    hits = [t in (DOG if c == "dog" else DOMESTIC_CAT) for t, c in zip(top, wanted)]
    assert all(hits), list(zip(wanted, top))
