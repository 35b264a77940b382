"""UperNet and SegFormer heads, hierarchical encoders (ConvNeXt, Swin, EfficientNet, ResNet, RegNet),
auxiliary outputs and their loss, model options through train.py's checkpoints, and the ensemble votes."""

import pytest
import timm
import torch
import torch.nn as nn
from timm.models.swin_transformer import _create_swin_transformer

import demo
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


# one tiny encoder per family; RegNet has no test model in timm, regnetx_002 is its smallest
FAMILIES = ["test_convnext", "swin_test", "test_efficientnet", "test_resnet", "regnetx_002"]
HEADS = ["upernet", "segformer"]


def build(name, encoder="test_convnext", num_classes=3, seed=0, **kwargs):
    torch.manual_seed(seed)
    if name in HEADS:
        kwargs.setdefault("decoder_channels", 32)
    return model.create_model(name, encoder, num_classes, **kwargs)


def images(n=2, c=3, h=64, w=64, seed=1):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def n_params(net, skip=None):
    return sum(p.numel() for k, p in net.named_parameters() if skip is None or not k.startswith(skip))


# --------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("encoder", FAMILIES)
@pytest.mark.parametrize("name", HEADS)
def test_forward_backward_odd_size(name, encoder):
    net = build(name, encoder).train()
    out = net(images(h=67, w=45))
    logits = out[0] if isinstance(out, list) else out
    assert logits.shape == (2, 3, 67, 45)
    logits.mean().backward()
    assert all(p.grad is not None for p in net.decoder.parameters())
    assert net.encoder.model.feature_info.reduction()[-1] == 32


@pytest.mark.parametrize("name", ["unetpp", "unet", "deeplabv3p"])
def test_existing_decoders_on_swin(name):
    net = build(name, "swin_test", **({"decoder_channels": 32} if name == "deeplabv3p" else {}))
    assert net.encoder.levels == [1, 2, 3, 4]  # stride 4 first: no stride-2 skip
    assert net.encoder.stride == 32  # Swin cannot dilate: DeepLabV3+ falls back to stride 32
    with torch.no_grad():
        assert net.eval()(images(n=1, h=67, w=96)).shape == (1, 3, 67, 96)


def test_swin_at_512_and_its_layout():
    net = build("segformer", "swin_test").eval()
    features = net.encoder(images(n=1, h=512, w=512))
    assert [tuple(f.shape[1:]) for f in features] == [(16, 128, 128), (32, 64, 64), (64, 32, 32), (128, 16, 16)]
    with torch.no_grad():
        assert net(images(n=1, h=512, w=512)).shape == (1, 3, 512, 512)


@pytest.mark.parametrize("name", HEADS)
def test_batch_size_one_in_train_mode(name):
    out = build(name).train()(images(n=1))
    assert all(o.shape == (1, 3, 64, 64) for o in (out if isinstance(out, list) else [out]))


@pytest.mark.parametrize("in_channels", [1, 3, 4])
@pytest.mark.parametrize("name", HEADS)
def test_in_channels(name, in_channels):
    net = build(name, in_channels=in_channels, num_classes=5).eval()
    with torch.no_grad():
        assert net(images(n=1, c=in_channels)).shape == (1, 5, 64, 64)


def test_unknown_option_names_the_model_and_its_options():
    with pytest.raises(ValueError, match=r"model 'deeplabv3p' has no option 'attention'.*decoder_channels"):
        model.create_model("deeplabv3p", "test_resnet", 3, attention="scse")


# --------------------------------------------------------------------------------------------- auxiliary outputs


def test_upernet_aux_head_only_in_training():
    net = build("upernet")
    assert net.aux_weights == (0.4,)
    outs = net.train()(images(h=67, w=64))
    assert isinstance(outs, list) and len(outs) == 2 and all(o.shape == (2, 3, 67, 64) for o in outs)
    outs[1].mean().backward()
    assert net.aux_head[0][0].weight.grad.abs().sum() > 0  # reads the stride-16 stage
    assert net.decoder.fuse[0].weight.grad is None  # the aux head does not go through the decoder
    with torch.no_grad():
        assert isinstance(net.eval()(images()), torch.Tensor)
    plain = build("upernet", aux_weight=0)
    assert plain.aux_head is None and plain.aux_weights == ()
    assert isinstance(plain.train()(images()), torch.Tensor)
    with pytest.raises(ValueError, match="aux_weight"):
        build("upernet", aux_weight=-1)


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


# --------------------------------------------------------------------------------------------- pooling and export


@pytest.mark.parametrize("size", [(2, 2), (3, 5), (7, 7), (13, 9), (16, 16)])
@pytest.mark.parametrize("bins", [1, 2, 3, 6])
def test_exact_adaptive_pool_equals_torch(size, bins):
    x = images(n=2, c=4, h=size[0], w=size[1])
    torch.testing.assert_close(model.ExactAdaptiveAvgPool2d(bins)(x), nn.AdaptiveAvgPool2d(bins)(x))


@pytest.mark.parametrize("name,size", [("upernet", 64), ("upernet", 96), ("segformer", 96)])
def test_onnx_export_matches_eager(name, size, tmp_path):
    """At 64 and 96 px the last stage is 2x2 and 3x3: pool scales 3 and 6, or 2 and 6, do not divide it."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    net = build(name).eval()
    x = images(n=1, h=size, w=size)
    path = str(tmp_path / "model.onnx")
    torch.onnx.export(net, (x,), path, input_names=["images"], output_names=["logits"], dynamo=False)
    session = ort.InferenceSession(path)
    assert [o.name for o in session.get_outputs()] == ["logits"]  # no auxiliary output in the graph
    (exported,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(exported), net(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,encoder", [("upernet", "test_convnext"), ("segformer", "swin_test")])
def test_torch_export_matches_eager(name, encoder):
    net = build(name, encoder).eval()
    x = images(h=67, w=64)
    exported = torch.export.export(net, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), net(x))


def test_torch_compile_matches_eager():
    net = build("upernet").eval()
    x = images(h=64, w=96)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(net, backend="eager")(x), net(x))


def test_local_weights_file_loads_into_convnext(tmp_path):
    torch.manual_seed(3)
    saved = timm.create_model("test_convnext").state_dict()
    torch.save(saved, tmp_path / "convnext.pth")
    net = build("upernet", weights=str(tmp_path / "convnext.pth"))
    encoder_state = net.encoder.model.state_dict()
    for key, value in encoder_state.items():  # features_only flattens the top level: stem.0 -> stem_0
        assert torch.equal(value, saved[key if key in saved else key.replace("_", ".", 1)]), key
    assert len(encoder_state) > 10


# --------------------------------------------------------------------------------------------- against smp


def test_parameter_counts_match_segmentation_models_pytorch():
    """Same timm encoders (stride-4 first), same decoder width; our UperNet's aux head has no smp counterpart."""
    smp = pytest.importorskip("segmentation_models_pytorch")
    for encoder in ("test_convnext", "swin_test"):
        ours = build("upernet", encoder, 11, decoder_channels=64)
        ref = smp.UPerNet(f"tu-{encoder}", encoder_weights=None, classes=11, decoder_channels=64)
        assert abs(n_params(ours, skip="aux_head") - n_params(ref)) / n_params(ref) < 0.02
        ours = build("segformer", encoder, 11, decoder_channels=64)
        ref = smp.Segformer(f"tu-{encoder}", encoder_weights=None, classes=11, decoder_segmentation_channels=64)
        assert abs(n_params(ours) - n_params(ref)) / n_params(ref) < 0.02


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
    return {"model": name, "encoder": encoder, "model_kwargs": {"decoder_channels": 32, **kwargs},
            "num_classes": 4, "class_names": ["Background", "a", "b", "c"], "image_size": size,
            "mean": [0.5] * 3, "std": [0.25] * 3, "state_dict": net.state_dict()}


@pytest.mark.parametrize("name", HEADS)
def test_checkpoint_round_trip_into_a_fused_member(name):
    saved = checkpoint(name, "test_convnext", 64, seed=0)
    net = build(name, num_classes=4, seed=1)
    net.load_state_dict(saved["state_dict"])
    member = ensembles.Member(saved)  # rebuilt from model_kwargs, BatchNorm folded into the convs
    assert not any(isinstance(m, nn.BatchNorm2d) for m in member.modules())
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(member(x), net.eval()((x - 0.5) / 0.25).softmax(1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("vote", ensembles.VOTES)
def test_ensemble_of_a_unet_and_an_upernet_at_different_sizes(vote):
    checkpoints = [checkpoint("upernet", "test_convnext", 96, 0),
                   checkpoint("unet", "test_resnet", 64, 1, decoder_channels=[32, 16, 16, 8, 8])]
    ensemble, names = ensembles.build_ensemble(["a.pt", "b.pt"], checkpoints, "cpu", vote=vote)
    with torch.no_grad():
        probs = ensemble(torch.rand(2, 3, 75, 50))
    assert probs.shape == (2, 4, 75, 50) and names == checkpoints[0]["class_names"]
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 75, 50))


# --------------------------------------------------------------------------------------------- train.py


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    demo.make_demo(str(root), size=64, n_train=4, n_val=2, n_test=1)
    return root


@pytest.mark.parametrize("model_args,model_kwargs", [
    (["--model", "upernet", "--encoder", "convnext_atto", "--decoder-channels", "32"], {"decoder_channels": 32}),
    (["--model", "segformer", "--encoder", "swin_test"], {}),
    (["--model", "unetpp", "--encoder", "test_resnet", "--deep-supervision", "--attention", "scse",
      "--aux-weight", "0.5", "--decoder-channels", "32", "16", "16", "8", "8"],
     {"deep_supervision": True, "attention": "scse", "aux_weight": 0.5, "decoder_channels": [32, 16, 16, 8, 8]}),
], ids=["upernet-convnext", "segformer-swin", "unetpp-deep-supervision"])
def test_train_one_epoch_and_restore_the_model_options(demo_root, tmp_path, model_args, model_kwargs):
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
