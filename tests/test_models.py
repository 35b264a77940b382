"""model.py: one suite over every registered model and a tiny encoder of each family (random init, CPU),
the heads' values against reference formulas and segmentation_models_pytorch, the auxiliary outputs and their
loss, export, weights files, checkpoints and ensembles.

A model added with @model.register_model is picked up by the registry-wide tests below without changes here.
"""
import copy
import inspect
import re

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.swin_transformer import _create_swin_transformer

import ensemble as ensembles
import inference
import loss
import model
import train
import utils


@timm.models.register_model
def swin_test(pretrained=False, **kwargs):
    """A Swin with one block of one head per stage: the real architecture at a CPU test's size."""
    kwargs = {"embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1), **kwargs}
    return _create_swin_transformer("swin_test", pretrained=pretrained, **kwargs)


MODELS = model.list_models()
# one tiny encoder per family: CNNs (stride 2 first) and transformer-style (stride 4 first);
# RegNet has no test model in timm, regnetx_002 is its smallest
ENCODERS = ["test_resnet", "test_efficientnet", "test_convnext", "swin_test", "regnetx_002"]
# narrow decoders keep the suite fast; the structure (and so every check) is the same at any width
NARROW = {"unetpp": {"decoder_channels": (32, 16, 16, 8, 8)}, "unet": {"decoder_channels": (32, 16, 16, 8, 8)},
          "deeplabv3p": {"decoder_channels": 32}, "upernet": {"decoder_channels": 32},
          "segformer": {"decoder_channels": 32}}


def build(name, encoder="test_efficientnet", num_classes=3, seed=0, **kwargs):
    """A registered model at random init with a narrow decoder (unless kwargs give one)."""
    torch.manual_seed(seed)
    return model.create_model(name, encoder, num_classes, **{**NARROW.get(name, {}), **kwargs})


def images(n=2, c=3, h=64, w=64, seed=1):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def outputs(out):
    """The logits and any auxiliary outputs of a forward pass, as a list."""
    return out if isinstance(out, list) else [out]


def randomize_batchnorm(module):
    """Non-trivial BatchNorm statistics and affine parameters, so eval-mode checks see them."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)


# --------------------------------------------------------------------------------------------- registry


def test_registry_lists_and_creates():
    assert {"unetpp", "unet", "deeplabv3p", "upernet", "segformer"} <= set(model.list_models())
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


def test_unknown_option_names_the_model_and_its_options():
    with pytest.raises(ValueError, match=r"model 'deeplabv3p' has no option 'attention'.*decoder_channels"):
        model.create_model("deeplabv3p", "test_resnet", 3, attention="scse")


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


@pytest.mark.parametrize("encoder, levels", [("test_resnet", [0, 1, 2, 3, 4]), ("test_efficientnet", [0, 1, 2, 3, 4]),
                                             ("test_convnext", [1, 2, 3, 4]), ("swin_test", [1, 2, 3, 4]),
                                             ("regnetx_002", [0, 1, 2, 3, 4])])
def test_every_encoder_family_gives_its_levels_down_to_stride_32(encoder, levels):
    encoder = model.Encoder(encoder)
    assert encoder.levels == levels and encoder.stride == 32
    assert encoder.model.feature_info.reduction() == [model.ENCODER_STRIDES[level] for level in levels]


# --------------------------------------------------------------------------------------------- every model


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_odd_size(name, encoder):
    """Any H and W, non-square; gradients reach the encoder's first layer, every decoder weight and the head."""
    net = build(name, encoder, num_classes=5).train()
    outs = outputs(net(images(h=33, w=47)))
    assert all(o.shape == (2, 5, 33, 47) for o in outs) and len(outs) == 1 + len(net.aux_weights)
    sum(o.square().mean() for o in outs).backward()
    first_encoder_param = next(net.encoder.parameters())
    assert first_encoder_param.grad is not None and first_encoder_param.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.decoder.parameters())
    assert all(p.grad.abs().sum() > 0 for p in net.head.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_odd_sizes_are_zero_padded_at_the_bottom_right_and_cropped_back(name):
    net = build(name, "test_resnet").eval()
    x = images(n=1, h=33, w=47)
    stride = net.encoder.stride
    with torch.no_grad():
        padded = net(F.pad(x, (0, -47 % stride, 0, -33 % stride)))
        torch.testing.assert_close(net(x), padded[..., :33, :47])


@pytest.mark.parametrize("name", MODELS)
def test_inputs_smaller_than_the_encoder_stride_are_padded(name):
    with torch.no_grad():
        assert build(name, "test_resnet", 4).eval()(torch.zeros(1, 3, 2, 2)).shape == (1, 4, 2, 2)


@pytest.mark.parametrize("name", MODELS)
def test_batch_size_one_in_train_mode(name):
    """No BatchNorm sees a single value per channel (the pooled branches have none)."""
    net = build(name, "test_efficientnet").train()
    outs = outputs(net(images(n=1, h=96, w=80)))
    assert all(o.shape == (1, 3, 96, 80) for o in outs)
    sum(o.mean() for o in outs).backward()


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("in_channels,num_classes", [(1, 1), (3, 11), (4, 2)])
def test_in_channels_and_classes(name, in_channels, num_classes):
    net = build(name, "test_resnet", num_classes, in_channels=in_channels).eval()
    assert (net.in_channels, net.num_classes) == (in_channels, num_classes)
    with torch.no_grad():
        assert net(images(n=1, c=in_channels)).shape == (1, num_classes, 64, 64)


@pytest.mark.parametrize("shape, dtype", [
    ((2, 1, 64, 64), torch.float32),  # fewer channels than the model takes
    ((2, 4, 64, 64), torch.float32),  # more
    ((3, 64, 64), torch.float32),  # no batch axis
    ((2, 3, 64, 64), torch.uint8),  # raw pixels, not normalised floats
])
def test_an_input_the_model_cannot_take_names_the_expected_one(shape, dtype):
    net = build("unet", "test_resnet", 4).eval()
    message = f"expected float images of shape N x 3 x H x W, got a {dtype} tensor of shape {shape}"
    with pytest.raises(ValueError, match=re.escape(message)):
        net(torch.zeros(shape, dtype=dtype))


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


@pytest.mark.parametrize("name", MODELS)
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


# torch.compile and torch.export take seconds a model: one encoder each, the heads on transformer-style ones
EXPORT_ENCODERS = {"upernet": "test_convnext", "segformer": "swin_test"}


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_torch_compile_matches_eager(name):
    net = build(name, EXPORT_ENCODERS.get(name, "test_efficientnet")).eval()
    x = images(h=64, w=96)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(net, backend="eager")(x), net(x))


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_torch_export_matches_eager(name):
    net = build(name, EXPORT_ENCODERS.get(name, "test_efficientnet")).eval()
    x = images(h=67, w=64)
    exported = torch.export.export(net, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), net(x))


@pytest.mark.parametrize("name,size", [("upernet", 64), ("upernet", 96), ("segformer", 96)])
def test_onnx_export_matches_eager(name, size, tmp_path):
    """At 64 and 96 px the last stage is 2x2 and 3x3: pool scales 3 and 6, or 2 and 6, do not divide it."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    net = build(name, "test_convnext").eval()
    x = images(n=1, h=size, w=size)
    path = str(tmp_path / "model.onnx")
    torch.onnx.export(net, (x,), path, input_names=["images"], output_names=["logits"], dynamo=False)
    session = ort.InferenceSession(path)
    assert [o.name for o in session.get_outputs()] == ["logits"]  # no auxiliary output in the graph
    (exported,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(exported), net(x), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------- model-specific


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


@pytest.mark.parametrize("name", ["unetpp", "unet", "deeplabv3p"])
def test_existing_decoders_on_swin(name):
    net = build(name, "swin_test")
    assert net.encoder.levels == [1, 2, 3, 4]  # stride 4 first: no stride-2 skip
    assert net.encoder.stride == 32  # Swin cannot dilate: DeepLabV3+ falls back to stride 32
    with torch.no_grad():
        assert net.eval()(images(n=1, h=67, w=96)).shape == (1, 3, 67, 96)


def test_swin_at_512_and_its_layout():
    net = build("segformer", "swin_test").eval()
    with torch.no_grad():
        features = net.encoder(images(n=1, h=512, w=512))
        assert [tuple(f.shape[1:]) for f in features] == [(16, 128, 128), (32, 64, 64), (64, 32, 32), (128, 16, 16)]
        assert net(images(n=1, h=512, w=512)).shape == (1, 3, 512, 512)


@pytest.mark.parametrize("size", [(2, 2), (3, 5), (7, 7), (13, 9), (16, 16)])
@pytest.mark.parametrize("bins", [1, 2, 3, 6])
def test_exact_adaptive_pool_equals_torch(size, bins):
    x = images(n=2, c=4, h=size[0], w=size[1])
    torch.testing.assert_close(model.ExactAdaptiveAvgPool2d(bins)(x), nn.AdaptiveAvgPool2d(bins)(x))


def conv_bn_relu(block, x, **conv_args):
    """A ConvBnAct (plain conv) in eval mode, written out: conv, affine BatchNorm with running statistics, ReLU."""
    conv, bn = block[0], block[1]
    x = F.conv2d(x, conv.weight, conv.bias, **conv_args)
    x = (x - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    return F.relu(x * bn.weight[:, None, None] + bn.bias[:, None, None])


def stage_features(channels, h=16, w=24, seed=3):
    """Random feature maps at strides 4, 8, 16 and 32 of an image of 4h x 4w."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, c, h >> i, w >> i, generator=generator) for i, c in enumerate(channels)]


def test_segformer_decoder_is_the_papers_all_mlp_head():
    """Known answer from the paper's order: every stage resized to stride 4, then projected, concatenated, fused."""
    channels = [4, 6, 8, 10]
    torch.manual_seed(0)
    decoder = model.SegFormerDecoder(channels, 5)
    randomize_batchnorm(decoder)
    features = stage_features(channels)
    size = features[0].shape[-2:]
    resized = [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in features]
    projected = [F.conv2d(f, p.weight, p.bias) for f, p in zip(resized, decoder.project)]
    with torch.no_grad():
        expected = conv_bn_relu(decoder.fuse, torch.cat(projected, dim=1))
        torch.testing.assert_close(decoder.eval()(features), expected, rtol=1e-5, atol=1e-5)


def test_upernet_decoder_is_pyramid_pooling_then_a_top_down_fpn():
    """Known answer written out from the paper: PPM on the stride-32 stage (torch's adaptive pooling), then each
    earlier stage adds its 1x1 lateral to the upsampled level above and gets a 3x3 output conv; all four levels at
    stride 4 are concatenated, finest first, and fused."""
    channels = [4, 6, 8, 10]
    torch.manual_seed(0)
    decoder = model.UperNetDecoder(channels, 8, pool_scales=(1, 2, 3, 6))
    randomize_batchnorm(decoder)
    features = stage_features(channels, h=24, w=36)  # a 6 x 9 last stage: pool scales 2 and 6 do not divide 9

    def up(x, like):
        return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)

    with torch.no_grad():
        last = features[-1]
        pooled = [up(F.relu(F.conv2d(nn.AdaptiveAvgPool2d(branch[0].output_size)(last), branch[1].weight,
                                     branch[1].bias)), last) for branch in decoder.ppm.branches]
        top = conv_bn_relu(decoder.ppm.bottleneck, torch.cat([last, *pooled], dim=1), padding=1)
        levels = [top]
        for k in (2, 1, 0):  # stride 16, 8, 4
            top = conv_bn_relu(decoder.lateral[k], features[k]) + up(top, features[k])
            levels.insert(0, conv_bn_relu(decoder.output[k], top, padding=1))
        fused = torch.cat([levels[0]] + [up(level, levels[0]) for level in levels[1:]], dim=1)
        expected = conv_bn_relu(decoder.fuse, fused, padding=1)
        torch.testing.assert_close(decoder.eval()(features), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------- auxiliary outputs


@pytest.mark.parametrize("encoder,aux", [("test_resnet", 3), ("test_convnext", 2)])
def test_deep_supervision(encoder, aux):
    net = build("unetpp", encoder, deep_supervision=True, attention="scse").train()
    outs = net(images(h=67, w=64))
    assert isinstance(outs, list) and len(outs) == 1 + aux and net.aux_weights == (1.0,) * aux
    assert all(o.shape == (2, 3, 67, 64) for o in outs)
    sum(o.mean() for o in outs).backward()
    assert all(h.weight.grad.abs().sum() > 0 for h in net.aux_heads)
    with torch.no_grad():
        assert net.eval()(images()).shape == (2, 3, 64, 64)  # a single tensor in eval mode
    plain = build("unetpp", encoder).train()
    assert isinstance(plain(images()), torch.Tensor)


def test_upernet_aux_head_only_in_training():
    net = build("upernet", "test_convnext")
    assert net.aux_weights == (0.4,)
    outs = net.train()(images(h=67, w=64))
    assert isinstance(outs, list) and len(outs) == 2 and all(o.shape == (2, 3, 67, 64) for o in outs)
    outs[1].mean().backward()
    assert net.aux_head[0][0].weight.grad.abs().sum() > 0
    assert net.decoder.fuse[0].weight.grad is None  # the aux head does not go through the decoder
    with torch.no_grad():
        assert isinstance(net.eval()(images()), torch.Tensor)
    plain = build("upernet", "test_convnext", aux_weight=0)
    assert plain.aux_head is None and plain.aux_weights == ()
    assert isinstance(plain.train()(images()), torch.Tensor)
    with pytest.raises(ValueError, match="aux_weight"):
        build("upernet", "test_convnext", aux_weight=-1)


def test_upernet_aux_logits_are_the_fcn_head_on_the_stride_16_stage():
    net = build("upernet", "test_convnext", dropout=0.0).train()  # no dropout: the outputs are deterministic
    x = images(h=64, w=96)
    _, aux = net(x)
    stage = net.encoder(x)[net.stages[2]]
    assert stage.shape[-2:] == (64 // 16, 96 // 16)
    expected = F.interpolate(net.aux_head(stage), size=(64, 96), mode="bilinear", align_corners=False)
    torch.testing.assert_close(aux, expected)


@pytest.mark.parametrize("name, kwargs, aux_head", [
    ("upernet", {"encoder": "test_convnext", "dropout": 0.0}, lambda net: net.aux_head[-1]),
    ("unetpp", {"encoder": "test_resnet", "deep_supervision": True}, lambda net: net.aux_heads[0]),
], ids=["upernet", "unetpp-deep-supervision"])
def test_aux_weight_scales_the_aux_heads_gradient_and_not_the_main_heads(name, kwargs, aux_head):
    """The model's aux_weights reach the loss as train.py builds it: doubling the weight doubles the auxiliary
    head's gradient; the main head, which no auxiliary output reads, gets the same gradient."""
    target = torch.randint(0, 3, (2, 64, 64), generator=torch.Generator().manual_seed(0))
    grads = []
    for weight in (0.5, 1.0):
        net = build(name, aux_weight=weight, **kwargs).train()
        criterion = loss.AuxiliaryLoss(loss.build_loss("ce:1", 3), net.aux_weights)
        criterion(net(images()), target).backward()
        grads.append((aux_head(net).weight.grad, [p.grad for p in net.head.parameters()][-1]))
    (aux_half, main_half), (aux_one, main_one) = grads
    assert aux_half.abs().sum() > 0
    torch.testing.assert_close(aux_one, 2 * aux_half)
    torch.testing.assert_close(main_one, main_half)


def test_auxiliary_loss_adds_weighted_terms():
    main_loss = loss.build_loss("ce:1", 3)
    criterion = loss.AuxiliaryLoss(main_loss, (0.4, 2.0))
    target = torch.randint(0, 3, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    logits, aux1, aux2 = (images(h=8, w=8, seed=s) for s in (1, 2, 3))
    expected = main_loss(logits, target) + 0.4 * main_loss(aux1, target) + 2.0 * main_loss(aux2, target)
    torch.testing.assert_close(criterion([logits, aux1, aux2], target), expected)
    torch.testing.assert_close(criterion(logits, target), main_loss(logits, target))  # eval mode: main only
    with pytest.raises(ValueError, match="1 auxiliary outputs"):
        criterion([logits, aux1], target)


# --------------------------------------------------------------------------------------------- against the reference


def smp_model(name, encoder, num_classes=3, **kwargs):
    smp = pytest.importorskip("segmentation_models_pytorch")
    cls = {"unetpp": smp.UnetPlusPlus, "unet": smp.Unet, "deeplabv3p": smp.DeepLabV3Plus, "upernet": smp.UPerNet,
           "segformer": smp.Segformer}[name]
    return cls(f"tu-{encoder}", encoder_weights=None, classes=num_classes, **kwargs)


def n_params(net, skip=None):
    return sum(p.numel() for k, p in net.named_parameters() if skip is None or not k.startswith(skip))


def smp_width(name):
    """The reference's keyword arguments for our narrow decoder of `name`."""
    key = "decoder_segmentation_channels" if name == "segformer" else "decoder_channels"
    return {key: NARROW[name]["decoder_channels"]}


CNNS, STRIDE_4_FIRST = ["test_resnet", "test_efficientnet", "test_convnext"], ["test_convnext", "swin_test"]


@pytest.mark.parametrize("name,encoder,ours_kwargs,ref_kwargs", [
    *[(name, encoder, {}, {}) for name in ("unetpp", "unet", "deeplabv3p") for encoder in CNNS],
    *[("unetpp", encoder, {"attention": "scse"}, {"decoder_attention_type": "scse"}) for encoder in CNNS],
    *[("deeplabv3p", encoder, {"aspp_separable": False}, {"decoder_aspp_separable": False}) for encoder in CNNS],
    *[(name, encoder, {}, {}) for name in ("upernet", "segformer") for encoder in STRIDE_4_FIRST],
])
def test_parameter_count_matches_reference(name, encoder, ours_kwargs, ref_kwargs):
    """Same timm encoders, same decoder widths; our UperNet's aux head has no smp counterpart."""
    ours = n_params(build(name, encoder, 11, **ours_kwargs), skip="aux_head")
    ref = n_params(smp_model(name, encoder, 11, **smp_width(name), **ref_kwargs))
    assert abs(ours - ref) / ref < 0.02, (ours, ref)


@pytest.mark.parametrize("name,ref_class", [("unetpp", "UnetPlusPlus"), ("unet", "Unet"), ("deeplabv3p", "DeepLabV3Plus"),
                                            ("segformer", "Segformer")])
def test_default_decoder_widths_match_reference(name, ref_class):
    """The default widths are smp's (UperNet's 512 is MMSegmentation's, smp uses 256)."""
    smp = pytest.importorskip("segmentation_models_pytorch")
    key = next(iter(smp_width(name)))
    ours = inspect.signature(getattr(model, name)).parameters["decoder_channels"].default
    assert ours == inspect.signature(getattr(smp, ref_class)).parameters[key].default


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
    ref = smp_model(name, encoder, **smp_width(name))
    net = build(name, encoder)
    state = {unet_key_from_reference(k): v for k, v in ref.state_dict().items()}
    net.load_state_dict(state)  # strict: every tensor maps one to one
    x = images(h=64, w=96)
    for mode in (False, True):  # eval, then train (batch statistics)
        ref.train(mode), net.train(mode)
        torch.testing.assert_close(net(x), ref(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("separable", [True, False])
def test_deeplab_outputs_match_reference_in_eval(separable):
    ref = smp_model("deeplabv3p", "test_resnet", decoder_atrous_rates=(6, 12, 18), decoder_aspp_separable=separable,
                    **smp_width("deeplabv3p"))
    net = build("deeplabv3p", "test_resnet", aspp_separable=separable)
    randomize_batchnorm(ref)
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


@pytest.mark.parametrize("encoder", ["test_resnet", "test_efficientnet", "test_convnext"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_file_loads_into_encoder(encoder, suffix, tmp_path):
    path = tmp_path / f"{encoder}{suffix}"
    saved = save_timm_weights(encoder, path)
    net = build("unetpp", encoder, weights=str(path)).eval()
    random = build("unetpp", encoder).eval()
    encoder_state = net.encoder.model.state_dict()
    assert len(encoder_state) > 10
    for key, value in encoder_state.items():  # features_only flattens the top level: stem.0 -> stem_0
        assert torch.equal(value, saved[key if key in saved else key.replace("_", ".", 1)]), key
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


# --------------------------------------------------------------------------------------------- ensembles


class Fixed(nn.Module):
    """A member whose probabilities are given."""

    def __init__(self, probs):
        super().__init__()
        self.probs = probs

    def forward(self, images):
        return self.probs


def test_hard_vote_with_known_member_outputs():
    # 3 classes, 3 pixels. Pixel 0: two members say class 0 weakly, one says class 2 strongly (soft: 2).
    # Pixel 1: members say 0, 1, 2 (a three-way tie): the highest mean probability, class 1, wins.
    # Pixel 2: all say class 2.
    members = [
        [[0.40, 0.30, 0.30], [0.50, 0.20, 0.30], [0.1, 0.1, 0.8]],
        [[0.40, 0.25, 0.35], [0.30, 0.60, 0.10], [0.2, 0.1, 0.7]],
        [[0.05, 0.05, 0.90], [0.05, 0.45, 0.50], [0.3, 0.1, 0.6]],
    ]
    probs = [torch.tensor(m).T.reshape(1, 3, 1, 3) for m in members]
    hard = ensembles.Ensemble([Fixed(p) for p in probs], vote="hard")(None)
    soft = ensembles.Ensemble([Fixed(p) for p in probs])(None)
    assert hard.argmax(1).flatten().tolist() == [0, 1, 2]
    assert soft.argmax(1).flatten().tolist() == [2, 1, 2]
    torch.testing.assert_close(hard.sum(1), torch.ones(1, 1, 3))  # still a distribution
    torch.testing.assert_close(hard[0, :, 0, 2], (torch.tensor([0.0, 0.0, 3.0]) + soft[0, :, 0, 2]) / 4)
    with pytest.raises(ValueError, match="unknown vote"):
        ensembles.Ensemble([], vote="max")


def checkpoint(name, encoder, size, seed, **kwargs):
    net = build(name, encoder, num_classes=4, seed=seed, **kwargs)
    net.train()(images(seed=seed))  # BatchNorm statistics away from their initial values
    return {"model": name, "encoder": encoder, "model_kwargs": {**NARROW.get(name, {}), **kwargs},
            "num_classes": 4, "class_names": ["Background", "a", "b", "c"], "image_size": size,
            "mean": [0.5] * 3, "std": [0.25] * 3, "state_dict": net.state_dict()}


@pytest.mark.parametrize("name", MODELS)
def test_checkpoint_round_trip_into_a_fused_member(name):
    saved = checkpoint(name, "test_convnext", 64, seed=0)
    net = build(name, "test_convnext", num_classes=4, seed=1)
    net.load_state_dict(saved["state_dict"])
    member = ensembles.Member(saved)  # rebuilt from model_kwargs, BatchNorm folded into the convs
    assert not any(isinstance(m, nn.BatchNorm2d) for m in member.modules())
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(member(x), net.eval()((x - 0.5) / 0.25).softmax(1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("vote", ensembles.VOTES)
def test_ensemble_of_a_unet_and_an_upernet_at_different_sizes(vote):
    """Each member at its own training size, resized back: the ensemble's probabilities are the vote of the members'
    own probabilities at the input size."""
    checkpoints = [checkpoint("upernet", "test_convnext", 96, 0), checkpoint("unet", "test_resnet", 64, 1)]
    ensemble, names = ensembles.build_ensemble(["a.pt", "b.pt"], checkpoints, "cpu", vote=vote)
    x = torch.rand(2, 3, 75, 50, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        probs = ensemble(x)
        members = [ensembles.Member(c)(x) for c in checkpoints]
    assert probs.shape == (2, 4, 75, 50) and names == checkpoints[0]["class_names"]
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 75, 50))
    alone = ensembles.Ensemble([Fixed(p) for p in members], vote=vote)(None)
    torch.testing.assert_close(probs, alone, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------- train.py


@pytest.mark.slow
@pytest.mark.parametrize("model_args,model_kwargs", [
    (["--model", "upernet", "--encoder", "convnext_atto", "--decoder-channels", "32"], {"decoder_channels": 32}),
    (["--model", "segformer", "--encoder", "swin_test"], {}),
    (["--model", "unetpp", "--encoder", "test_resnet", "--deep-supervision", "--attention", "scse",
      "--aux-weight", "0.5", "--decoder-channels", "32", "16", "16", "8", "8"],
     {"deep_supervision": True, "attention": "scse", "aux_weight": 0.5, "decoder_channels": [32, 16, 16, 8, 8]}),
], ids=["upernet-convnext", "segformer-swin", "unetpp-deep-supervision"])
def test_train_one_epoch_and_restore_the_model_options(demo_set, tmp_path, model_args, model_kwargs):
    demo_root = demo_set(size=64, n_train=4, n_val=2, n_test=1)
    output = tmp_path / "run"
    args = train.get_args_parser().parse_args([
        *model_args, "--data-root", str(demo_root), "--cache-dir", str(tmp_path / "cache"), "--output", str(output),
        "--size", "64", "--batch-size", "2", "--workers", "0", "--device", "cpu", "--epochs", "1"])
    train.main(args)
    saved = utils.load_checkpoint(output / utils.LAST_CHECKPOINT)
    assert saved["model_kwargs"] == model_kwargs
    member = ensembles.Member(saved)  # rebuilt from model_kwargs alone; load_state_dict is strict
    with torch.no_grad():
        assert member(torch.rand(1, 3, 48, 80)).shape == (1, 11, 48, 80)
    csv = tmp_path / "submission.csv"
    inference.main(inference.get_args_parser().parse_args([
        "--checkpoints", str(output), "--data-root", str(demo_root), "--workers", "0", "--device", "cpu",
        "--vote", "hard", "--output", str(csv)]))
    assert len(utils.read_submission(csv, 11)) == 1
    net = member.probs.net
    if "deep_supervision" in model_kwargs:
        assert net.aux_weights == (0.5, 0.5, 0.5)
    elif saved["model"] == "upernet":
        assert net.aux_weights == (0.4,)
