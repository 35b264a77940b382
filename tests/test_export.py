"""export.py and ONNX members in inference.py: every registered model round-trips, wrong exports are refused,
and onnxruntime's submission equals PyTorch's."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import coco_utils
import ensemble as ensembles
import export
import inference
import model as models
import utils

ENCODER = "test_resnet"


@pytest.fixture(scope="module")
def demo_root(demo_set):
    """A tiny demo set whose images are 64x64, the checkpoints' training size."""
    return demo_set(size=64, n_train=1, n_val=1, n_test=3)


@pytest.fixture(scope="module")
def class_names(demo_root):
    return coco_utils.Coco(demo_root / "test.json", demo_root, expect_annotations=False).class_names


@pytest.fixture(scope="module")
def exported(demo_root, class_names, write_checkpoint, tmp_path_factory):
    """(checkpoint, its ONNX export at the training size)."""
    folder = tmp_path_factory.mktemp("exported")
    checkpoint = write_checkpoint(folder / utils.BEST_CHECKPOINT, class_names)
    onnx_path = folder / "model.onnx"
    export.main(export_args(checkpoint, onnx_path, demo_root))
    return checkpoint, onnx_path


def export_args(checkpoint, output, root, *extra):
    return export.get_args_parser().parse_args(
        ["--checkpoint", str(checkpoint), "--output", str(output), "--data-root", str(root), *extra])


@pytest.mark.slow
@pytest.mark.parametrize("size,output", [(64, "probabilities"), (72, "labels")])
@pytest.mark.parametrize("name", models.list_models())
def test_every_model_exports_and_matches_pytorch(name, size, output, demo_root, class_names, write_checkpoint,
                                                 tmp_path):
    checkpoint = write_checkpoint(tmp_path / utils.BEST_CHECKPOINT, class_names, name)
    labels = output == "labels"
    result = export.main(export_args(checkpoint, tmp_path / "m.onnx", demo_root, "--size", str(size),
                                     *(["--labels"] if labels else [])))
    assert result["agreement"] >= 0.999 and (labels or result["diff"] <= 1e-4)
    # independently of export.py's own check: a batch of 3 (the batch size is free) of random pixels
    images = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images.numpy()})[0]
    saved = utils.load_checkpoint(checkpoint)
    with torch.inference_mode():
        expected = ensembles.NormalisedSoftmax(export.load_net(saved), saved["mean"], saved["std"])(images / 255.0)
    if labels:
        assert got.shape == (3, size, size) and got.dtype == np.uint8
        assert (got == expected.argmax(1).numpy()).mean() >= 0.999
    else:
        assert got.shape == (3, len(class_names), size, size)
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-4)


@pytest.mark.slow
def test_metadata_describe_the_model(exported, class_names):
    checkpoint, onnx_path = exported
    model = onnx.load(str(onnx_path))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["images"]
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    described = ensembles.open_onnx(str(onnx_path))
    saved = utils.load_checkpoint(checkpoint)
    assert described["class_names"] == class_names
    assert described["palette"] == utils.class_palette(len(class_names)).tolist()
    assert described["input_size"] == [64, 64] and described["image_size"] == 64
    assert (described["mean"], described["std"]) == (saved["mean"], saved["std"])
    assert (described["model"], described["encoder"], described["paint_order"]) == ("deeplabv3p", ENCODER, "area")
    assert described["output"] == "probabilities"


@pytest.mark.slow
def test_a_wrong_export_is_refused_and_the_existing_file_kept(demo_root, class_names, write_checkpoint, tmp_path,
                                                              monkeypatch):
    checkpoint = write_checkpoint(tmp_path / utils.BEST_CHECKPOINT, class_names)
    output = tmp_path / "model.onnx"
    output.write_bytes(b"the previous export")

    prepare = ensembles.prepare_for_inference

    def perturbed(net):  # what a wrong BatchNorm folding would do: weights that are not the checkpoint's
        net = prepare(net)
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(1.5)
        return net

    monkeypatch.setattr(export.ensembles, "prepare_for_inference", perturbed)
    with pytest.raises(utils.UserError, match=r"refusing to write .*model.onnx: .*differ by up to"):
        export.main(export_args(checkpoint, output, demo_root))
    assert output.read_bytes() == b"the previous export"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def predict_csv(root, checkpoints, output, *extra):
    inference.main(inference.get_args_parser().parse_args(
        ["--checkpoints", *map(str, checkpoints), "--data-root", str(root), "--workers", "0", "--device", "cpu",
         "--output", str(output), *extra]))
    return utils.read_submission(output, 11)


@pytest.mark.slow
@pytest.mark.parametrize("members,extra", [("onnx", []), ("onnx", ["--tta"]), ("both", [])],
                         ids=["onnx", "onnx-tta", "ensemble-pt-onnx"])
def test_onnx_submission_equals_pytorch(exported, demo_root, tmp_path, members, extra):
    checkpoint, onnx_path = exported
    expected = predict_csv(demo_root, [checkpoint], tmp_path / "pt.csv", *extra)
    got = predict_csv(demo_root, [onnx_path] if members == "onnx" else [checkpoint, onnx_path],
                      tmp_path / "onnx.csv", *extra)
    assert list(got) == list(expected)
    differing = sum(int((got[k] != expected[k]).sum()) for k in expected) / sum(m.size for m in expected.values())
    print(f"onnxruntime vs PyTorch submission ({members}, {extra}): {100 * differing:.4f} % of pixels differ")
    assert differing < 0.001


@pytest.mark.slow
def test_onnx_member_resizes_like_the_checkpoint(exported):
    """Images of another size: the same probabilities up to the uint8 rounding of the resized input."""
    checkpoint, onnx_path = exported
    torch_member, _ = ensembles.load_ensemble([str(checkpoint)], "cpu")
    onnx_member, _ = ensembles.load_ensemble([str(onnx_path)], "cpu")
    images = torch.randint(0, 256, (2, 3, 80, 96), generator=torch.Generator().manual_seed(2)) / 255.0
    with torch.inference_mode():
        expected, got = torch_member(images), onnx_member(images)
    assert got.shape == expected.shape == (2, 11, 80, 96)
    assert (got - expected).abs().max() < 0.02


@pytest.mark.slow
def test_scale_tta_on_a_fixed_size_onnx_is_a_clear_error(exported):
    _, onnx_path = exported
    args = inference.get_args_parser().parse_args(["--tta", "--tta-scales", "0.5", "1.0"])
    with pytest.raises(utils.UserError, match="--tta-scales"):
        ensembles.load_ensemble([str(onnx_path)], "cpu", ensembles.build_tta(args))


def test_a_foreign_onnx_file_is_a_clear_error(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(graph), tmp_path / "other.onnx")
    with pytest.raises(utils.UserError, match="not written by export.py"):
        ensembles.load_ensemble([str(tmp_path / "other.onnx")], "cpu")
    (tmp_path / "cut.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(utils.UserError, match="cannot be loaded by onnxruntime"):
        ensembles.load_ensemble([str(tmp_path / "cut.onnx")], "cpu")
