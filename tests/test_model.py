"""Tests for model.py on tiny timm encoders (random init, CPU)."""
import copy
import re

import pytest
import timm
import torch
import torch.nn as nn

import ensemble as ensembles
import model
import utils

ENCODERS = ["test_resnet", "test_efficientnet", "test_convnext"]  # CNN x2, transformer-style (stride 4 first)
MODELS = ["unetpp", "unet", "deeplabv3p"]


def build(name, encoder="test_efficientnet", num_classes=3, seed=0, **kwargs):
    torch.manual_seed(seed)
    return model.create_model(name, encoder, num_classes, **kwargs)


def images(n=2, c=3, h=64, w=64, seed=1):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- registry


def test_registry_lists_and_creates():
    assert {"unetpp", "unet", "deeplabv3p"} <= set(model.list_models())
    assert model.list_models() == sorted(model.list_models())
    with pytest.raises(ValueError, match="unknown model"):
        model.create_model("nope", "test_resnet", 3)


def test_register_model_adds_a_builder():
    @model.register_model
    def tiny_unet(encoder, num_classes, in_channels=3, pretrained=False, weights=None):
        return model.create_model("unet", encoder, num_classes, in_channels, pretrained, weights,
                                  decoder_channels=(32, 16, 16, 8, 8))

    try:
        assert "tiny_unet" in model.list_models()
        net = model.create_model("tiny_unet", "test_resnet", 2)
        assert net(images()).shape == (2, 2, 64, 64)
    finally:
        del model._MODEL_BUILDERS["tiny_unet"]


def test_aliases_resolve_to_timm_models_with_hub_weights():
    pretrained = set(timm.list_pretrained())
    for alias, name in model.ENCODER_ALIASES.items():
        assert model.resolve_encoder(alias) == name
        assert name in pretrained, alias
    assert model.resolve_encoder("resnet26d") == "resnet26d"  # any timm name passes through


def test_encoder_normalization():
    assert model.encoder_normalization("effb4") == (utils.IMAGENET_MEAN, utils.IMAGENET_STD)
    assert model.encoder_normalization("test_resnet") == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert model.encoder_normalization("not_a_model") == (utils.IMAGENET_MEAN, utils.IMAGENET_STD)


# --------------------------------------------------------------------------------------------- shapes, gradients


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_odd_size(name, encoder):
    net = build(name, encoder, num_classes=5).train()
    out = net(images(h=67, w=71))
    assert out.shape == (2, 5, 67, 71)
    out.square().mean().backward()
    first_encoder_param = next(net.encoder.parameters())
    assert first_encoder_param.grad is not None and first_encoder_param.grad.abs().sum() > 0
    assert net.head.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.decoder.parameters())


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("in_channels,num_classes", [(1, 1), (3, 11), (4, 2)])
def test_in_channels_and_classes(name, in_channels, num_classes):
    net = build(name, "test_resnet", num_classes, in_channels=in_channels).eval()
    assert (net.in_channels, net.num_classes) == (in_channels, num_classes)
    with torch.no_grad():
        assert net(images(c=in_channels)).shape == (2, num_classes, 64, 64)


@pytest.mark.parametrize("name", MODELS)
def test_batch_size_one_in_train_mode(name):
    net = build(name, "test_efficientnet").train()
    out = net(images(n=1, h=96, w=80))
    assert out.shape == (1, 3, 96, 80)
    out.mean().backward()


def test_a_500x375_image():
    net = build("deeplabv3p", "test_resnet").eval()
    with torch.no_grad():
        assert net(images(n=1, h=375, w=500)).shape == (1, 3, 375, 500)


def test_deeplab_output_stride_and_rates():
    for output_stride, rates in [(16, (6, 12, 18)), (8, (12, 24, 36))]:
        net = build("deeplabv3p", "test_resnet", output_stride=output_stride)
        assert net.encoder.stride == output_stride
        dilations = [branch[0].dilation[0] for branch in net.decoder.aspp[0].branches[1:]]
        assert tuple(dilations) == rates
        with torch.no_grad():
            assert net.eval()(images(h=70, w=64)).shape == (2, 3, 70, 64)
    with pytest.raises(ValueError, match="output_stride"):
        build("deeplabv3p", "test_resnet", output_stride=32)


@pytest.mark.parametrize("encoder,aux", [("test_resnet", 3), ("test_convnext", 2)])
def test_deep_supervision(encoder, aux):
    net = build("unetpp", encoder, deep_supervision=True, attention="scse").train()
    outs = net(images(h=67, w=64))
    assert isinstance(outs, list) and len(outs) == 1 + aux
    assert all(o.shape == (2, 3, 67, 64) for o in outs)
    sum(o.mean() for o in outs).backward()
    assert all(h.weight.grad.abs().sum() > 0 for h in net.aux_heads)
    with torch.no_grad():
        assert net.eval()(images()).shape == (2, 3, 64, 64)  # a single tensor in eval mode
    plain = build("unetpp", encoder).train()
    assert isinstance(plain(images()), torch.Tensor)


# --------------------------------------------------------------------------------------------- against the reference


def smp_model(name, encoder, num_classes=3, **kwargs):
    smp = pytest.importorskip("segmentation_models_pytorch")
    cls = {"unetpp": smp.UnetPlusPlus, "unet": smp.Unet, "deeplabv3p": smp.DeepLabV3Plus}[name]
    return cls(f"tu-{encoder}", encoder_weights=None, classes=num_classes, **kwargs)


def n_params(net):
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("name,ours_kwargs,ref_kwargs", [
    ("unetpp", {}, {}),
    ("unetpp", {"attention": "scse"}, {"decoder_attention_type": "scse"}),
    ("unet", {}, {}),
    ("deeplabv3p", {}, {}),
    ("deeplabv3p", {"aspp_separable": False}, {"decoder_aspp_separable": False}),
])
def test_parameter_count_matches_reference(name, encoder, ours_kwargs, ref_kwargs):
    ours, ref = n_params(build(name, encoder, 11, **ours_kwargs)), n_params(smp_model(name, encoder, 11, **ref_kwargs))
    assert abs(ours - ref) / ref < 0.02, (ours, ref)


def unet_key_from_reference(key):
    """segmentation_models_pytorch's x_{d}_{l} block is our node X^{3-l, l-d+1}; x_0_4 is the last block."""
    match = re.match(r"decoder\.blocks\.x_(\d)_(\d)\.(.*)", key) or re.match(r"decoder\.blocks\.(\d)\.(.*)", key)
    if match is None:
        return key.replace("segmentation_head.0.", "head.")
    if len(match.groups()) == 2:  # plain UNet: blocks.{l}
        d, (l, rest) = 0, (int(match.group(1)), match.group(2))
    else:
        d, l, rest = int(match.group(1)), int(match.group(2)), match.group(3)
    node = "to_full_resolution" if l == 4 else f"nodes.x_{3 - l}_{l - d + 1}"
    rest = rest.replace("conv1.0.", "conv1.").replace("conv1.1.", "bn1.")
    return f"decoder.{node}.{rest}"


@pytest.mark.parametrize("encoder", ["test_resnet", "test_convnext"])
@pytest.mark.parametrize("name", ["unetpp", "unet"])
def test_unet_outputs_match_reference(name, encoder):
    ref = smp_model(name, encoder)
    net = build(name, encoder)
    state = {unet_key_from_reference(k): v for k, v in ref.state_dict().items()}
    net.load_state_dict(state)  # strict: every tensor maps one to one
    x = images(h=64, w=96)
    for mode in (False, True):  # eval, then train (batch statistics)
        ref.train(mode), net.train(mode)
        torch.testing.assert_close(net(x), ref(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("separable", [True, False])
def test_deeplab_outputs_match_reference_in_eval(separable):
    ref = smp_model("deeplabv3p", "test_resnet", decoder_atrous_rates=(6, 12, 18), decoder_aspp_separable=separable)
    net = build("deeplabv3p", "test_resnet", aspp_separable=separable)
    with torch.no_grad():
        for module in ref.modules():  # non-trivial BatchNorm statistics
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5), module.running_var.uniform_(0.5, 2)
    ref_state = ref.state_dict()
    pool = "decoder.aspp.0.convs.4."
    ours_keys = [k for k in net.state_dict() if ".image_pooling." not in k]
    ref_values = [v for k, v in ref_state.items() if not k.startswith(pool)]
    assert len(ours_keys) == len(ref_values)  # every other tensor maps one to one, in order
    state = dict(zip(ours_keys, ref_values))
    # The reference's image-pooling branch is conv -> BN; ours a biased conv (so batch size 1
    # trains). In eval mode that BN is affine: fold it into our conv.
    scale = ref_state[pool + "2.weight"] / torch.sqrt(ref_state[pool + "2.running_var"] + 1e-5)
    state["decoder.aspp.0.image_pooling.conv.weight"] = ref_state[pool + "1.weight"] * scale[:, None, None, None]
    state["decoder.aspp.0.image_pooling.conv.bias"] = ref_state[pool + "2.bias"] - ref_state[pool + "2.running_mean"] * scale
    net.load_state_dict(state)
    ref.eval(), net.eval()
    x = images(h=64, w=96)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------- compile, export, state


@pytest.mark.parametrize("name", ["unetpp", "deeplabv3p"])
def test_torch_compile_matches_eager(name):
    net = build(name).eval()
    x = images(h=64, w=96)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(net, backend="eager")(x), net(x))


@pytest.mark.parametrize("name", ["unetpp", "deeplabv3p"])
def test_torch_export_matches_eager(name):
    net = build(name).eval()
    x = images(h=67, w=64)
    exported = torch.export.export(net, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), net(x))


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_round_trip(name, tmp_path):
    net = build(name, seed=0).train()
    net(images())  # move BatchNorm statistics away from their initial values
    torch.save(net.state_dict(), tmp_path / "model.pth")
    other = build(name, seed=1)
    other.load_state_dict(torch.load(tmp_path / "model.pth", weights_only=True))
    net.eval(), other.eval()
    with torch.no_grad():
        assert torch.equal(net(images()), other(images()))


@pytest.mark.parametrize("name", ["unetpp", "deeplabv3p"])
def test_prepare_for_inference_matches_and_fuses(name):
    net = build(name, "test_efficientnet").train()
    with torch.no_grad():
        for _ in range(2):  # non-trivial BatchNorm statistics
            net(images(seed=7) * 2 + 0.5)
    net.eval()
    x = images(h=67, w=71)
    with torch.no_grad():
        expected = net(x)
        fast = ensembles.prepare_for_inference(copy.deepcopy(net))
        torch.testing.assert_close(fast(x), expected, rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert (fast.num_classes, fast.in_channels) == (net.num_classes, net.in_channels)


# --------------------------------------------------------------------------------------------- encoder weights


def save_timm_weights(name, path, seed=3):
    torch.manual_seed(seed)
    state = timm.create_model(name).state_dict()  # a whole classifier, as published on the hub
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return state


@pytest.mark.parametrize("encoder", ["test_resnet", "test_efficientnet"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_file_loads_into_encoder(encoder, suffix, tmp_path):
    path = tmp_path / f"{encoder}{suffix}"
    saved = save_timm_weights(encoder, path)
    net = build("unetpp", encoder, weights=str(path)).eval()
    random = build("unetpp", encoder).eval()
    encoder_state = net.encoder.model.state_dict()
    for key, value in encoder_state.items():
        assert torch.equal(value, saved[key]), key
    x = images()
    with torch.no_grad():
        assert not torch.allclose(net.encoder(x)[-1], random.encoder(x)[-1])
    four = build("deeplabv3p", encoder, in_channels=4, weights=str(path))  # stem adapted to 4 channels
    assert four(images(c=4)).shape == (2, 3, 64, 64)


def test_checkpoint_with_state_dict_key(tmp_path):
    saved = save_timm_weights("test_resnet", tmp_path / "plain.pth")
    torch.save({"state_dict": saved, "epoch": 3}, tmp_path / "checkpoint.pth")
    net = build("unet", "test_resnet", weights=str(tmp_path / "checkpoint.pth"))
    assert torch.equal(net.encoder.model.state_dict()["conv1.0.weight"], saved["conv1.0.weight"])


def test_missing_weights_file_names_the_option(tmp_path):
    with pytest.raises(utils.UserError, match="--weights"):
        build("unetpp", "test_resnet", weights=str(tmp_path / "missing.pth"))


def test_failed_download_points_to_local_weights(monkeypatch):
    def offline(*args, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("no internet")
        return create(*args, pretrained=pretrained, **kwargs)

    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(RuntimeError, match="weights=PATH"):
        build("unetpp", "test_resnet", pretrained=True)
