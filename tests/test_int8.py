"""export.py --int8: calibration photos, the accuracy gate, the metadata, and the int8 file predicting through
inference.py and serve.py like any ONNX export."""
import json

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import coco_utils
import dataset as data
import ensemble as ensembles
import export
import images as imaging
import serve
import utils


def export_args(checkpoint, output, root, *extra):
    return export.get_args_parser().parse_args(
        ["--checkpoint", str(checkpoint), "--output", str(output), "--data-root", str(root), *map(str, extra)])


@pytest.fixture(scope="module")
def int8_export(tiny_run, tiny_demo, tmp_path_factory):
    """(int8 file, export.main's result, its printed line): tiny_run calibrated on train.json, gated on val.json."""
    output = tmp_path_factory.mktemp("int8") / "model.int8.onnx"
    result = export.main(export_args(tiny_run, output, tiny_demo, "--int8", "--calibration", tiny_demo / "train.json",
                                     "--eval-json", "val.json", "--max-miou-drop", 1))
    return output, result


@pytest.mark.slow
def test_int8_export_records_precision_and_the_gate(int8_export, tiny_run):
    output, result = int8_export
    check = result["int8"]
    assert set(check) == {"eval_json", "eval_images", "float_miou", "int8_miou", "max_miou_drop"}
    assert (check["eval_json"], check["eval_images"], check["max_miou_drop"]) == ("val.json", 4, 1.0)
    described = ensembles.open_onnx(str(output))
    assert described["precision"] == "int8" and described["calibration_photos"] == 8
    assert described["int8_check"] == check
    assert described["output"] == "probabilities" and described["input_size"] == [64, 64]
    assert described["class_names"] == utils.load_checkpoint(tiny_run / utils.BEST_CHECKPOINT)["class_names"]
    ops = {node.op_type for node in onnx.load(str(output)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "BatchNormalization" not in ops


@pytest.mark.slow
def test_a_float_export_says_float32(tiny_run, tiny_demo, tmp_path):
    export.main(export_args(tiny_run, tmp_path / "m.onnx", tiny_demo))
    assert ensembles.open_onnx(str(tmp_path / "m.onnx"))["precision"] == "float32"


@pytest.mark.slow
def test_the_int8_file_predicts_in_inference_and_serve(int8_export, tiny_demo, run_inference, tmp_path):
    output, result = int8_export
    scores = run_inference("--checkpoints", output, "--data-root", tiny_demo, "--json", "val.json", "--eval",
                           "--output", tmp_path / "sub.csv", "--save-masks", tmp_path / "masks")
    assert scores["miou"] == pytest.approx(result["int8"]["int8_miou"], abs=1e-9)  # the gate scored what inference scores
    coco = coco_utils.Coco(tiny_demo / "val.json", tiny_demo)
    rgb = imaging.read_image(coco.image_path(coco.images[0]))
    segmenter = serve.Segmenter([str(output)])
    mask = segmenter.predict(rgb)
    assert mask.shape == rgb.shape[:2] and mask.dtype == np.uint8 and mask.max() < len(segmenter.class_names)
    # serve.py labels the photo as inference.py labelled it
    np.testing.assert_array_equal(mask, data.read_label_png(str(tmp_path / "masks" / data.output_name(
        coco.images[0]["file_name"]))))


@pytest.mark.slow
def test_the_gate_refuses_a_larger_drop_and_keeps_the_file(tiny_run, tiny_demo, tmp_path):
    output = tmp_path / "model.int8.onnx"
    output.write_bytes(b"the previous export")
    with pytest.raises(utils.UserError, match=r"refusing to write .*model.int8.onnx: int8 mIoU 0\.\d{4} against "
                                              r"float 0\.\d{4} on val.json \(4 images\), a drop of -?0\.\d{4} above "
                                              r"--max-miou-drop -1; any existing file is kept"):
        export.main(export_args(tiny_run, output, tiny_demo, "--int8", "--calibration", tiny_demo / "batch_04_test",
                                "--calibration-size", 2, "--eval-json", "val.json", "--max-miou-drop", -1))
    assert output.read_bytes() == b"the previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.int8.onnx"]


@pytest.mark.slow
def test_without_labels_the_agreement_on_the_calibration_photos_is_recorded(tiny_run, tiny_demo, tmp_path, capsys):
    output = tmp_path / "model.int8.onnx"
    result = export.main(export_args(tiny_run, output, tiny_demo, "--int8", "--calibration",
                                     tiny_demo / "*" / "*.jpg", "--calibration-size", 5))
    check = result["int8"]
    assert check["calibration_photos"] == 5 and 0.5 < check["argmax_agreement"] <= 1
    assert ensembles.open_onnx(str(output))["int8_check"] == check
    assert (f"calibrated on 5 photos) from {tiny_run / utils.BEST_CHECKPOINT}; argmax agreement with the float "
            f"model on the 5 calibration photos {100 * check['argmax_agreement']:.3f} % (mIoU not checked: pass "
            f"--eval-json with a labelled json)") in capsys.readouterr().out


def test_calibration_photos_from_folders_globs_and_jsons(tiny_demo):
    coco = json.loads((tiny_demo / "train.json").read_text())
    train = sorted(str(tiny_demo / image["file_name"]) for image in coco["images"])
    test = sorted(str(p) for p in (tiny_demo / "batch_04_test").glob("*.jpg"))
    assert len(train) == 8 and len(test) == 3
    assert export.calibration_paths([tiny_demo / "train.json"], 64) == train
    assert export.calibration_paths([tiny_demo / "batch_04_test"], 64) == test
    every = sorted(str(p) for p in tiny_demo.glob("*/*.jpg"))
    assert export.calibration_paths([str(tiny_demo / "*" / "*.jpg")], 64) == every
    # a photo named twice counts once; fewer wanted: spread evenly over those found
    assert export.calibration_paths([tiny_demo / "train.json", tiny_demo / "batch_04_test"], 64) == sorted(train + test)
    assert export.calibration_paths([tiny_demo / "batch_04_test", str(tiny_demo / "*" / "*.jpg")], 64) == every
    assert export.calibration_paths([tiny_demo / "train.json"], 3) == [train[0], train[4], train[7]]


def test_calibration_inputs_are_what_the_onnx_member_feeds(tiny_demo, tmp_path):
    photo = tmp_path / "photo.png"
    rgb = np.random.default_rng(0).integers(0, 256, (80, 96, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(photo)

    class Recording:  # an onnxruntime session that keeps what it is given
        def get_inputs(self):
            return [type("Input", (), {"name": "images"})]

        def run(self, _, feed):
            self.fed = feed["images"]
            return [np.zeros((1, 11, 64, 64), np.float32)]

    session = Recording()
    member = ensembles.OnnxProbabilities(session)
    member(ensembles.resize_rows(torch.from_numpy(rgb).permute(2, 0, 1)[None], (64, 64)))
    np.testing.assert_array_equal(export.model_inputs([str(photo)], 64), session.fed)


@pytest.mark.slow
@pytest.mark.parametrize("make", ["empty folder", "not an image", "missing"])
def test_calibration_without_readable_photos_is_refused_before_any_work(make, tiny_run, tiny_demo, tmp_path,
                                                                        monkeypatch):
    folder = tmp_path / "photos"
    if make != "missing":
        folder.mkdir()
    if make == "not an image":
        (folder / "a.jpg").write_text("not a photo")
    monkeypatch.setattr(export, "export_onnx", lambda *_: pytest.fail("exported before the photos were checked"))
    message = "matches no file or folder" if make == "missing" else "no readable .* image in .*photos"
    with pytest.raises(utils.UserError, match=message):
        export.main(export_args(tiny_run, tmp_path / "m.onnx", tiny_demo, "--int8", "--calibration", folder))


@pytest.mark.slow
@pytest.mark.parametrize("flags,message", [
    (["--int8"], r"--int8 needs --calibration PATH"),
    (["--calibration", "photos"], r"--calibration only apply to an int8 export: add --int8"),
    (["--int8", "--labels", "--calibration", "photos"], r"--int8 writes a probabilities model .*: leave out --labels"),
    (["--int8", "--calibration", "train.json", "--eval-json", "test.json"], r"test.json holds no annotations"),
])
def test_int8_flags_are_checked(flags, message, tiny_run, tiny_demo, monkeypatch):
    monkeypatch.chdir(tiny_demo)
    monkeypatch.setattr(export, "export_onnx", lambda *_: pytest.fail("exported before the flags were checked"))
    with pytest.raises(utils.UserError, match=message):
        export.main(export_args(tiny_run, "m.onnx", tiny_demo, *flags))
