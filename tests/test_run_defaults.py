"""The run folder is the source of defaults: a run trained on the user's own data root is predicted,
exported and pseudo-labelled without repeating --data-root, and nothing touches the demo set."""
import shutil

import pytest

import coco_utils
import dataset
import export
import utils


@pytest.fixture
def no_demo(monkeypatch):
    """Fail the test if anything would build or read the demo set."""
    def refuse(*args, **kwargs):
        raise AssertionError("the demo set was asked for")
    monkeypatch.setattr(dataset, "ensure_demo", refuse)


@pytest.fixture
def own_run(tiny_run, tiny_demo, tmp_path):
    """A copy of tiny_run, which was trained on a data root of its own (not the demo default)."""
    assert str(tiny_demo) != dataset.DEFAULT_DATA_ROOT
    return shutil.copytree(tiny_run, tmp_path / "run")


@pytest.mark.slow
def test_inference_export_and_pseudo_labels_read_the_runs_own_data_root(own_run, tiny_demo, tmp_path, no_demo,
                                                                         run_inference, run_pseudo_label, capsys):
    run_inference("--checkpoints", own_run, "--output", tmp_path / "submission.csv")
    rows = utils.read_submission(tmp_path / "submission.csv", 11)
    test_json = coco_utils.Coco(tiny_demo / "test.json", tiny_demo, expect_annotations=False)
    assert list(rows) == [image["file_name"] for image in test_json.images]
    assert f"data root {tiny_demo}, the checkpoints' own" in capsys.readouterr().out

    scores = run_inference("--checkpoints", own_run, "--json", "val.json", "--eval")
    assert 0 <= scores["miou"] <= 1

    onnx_path = tmp_path / "model.onnx"
    export.main(export.get_args_parser().parse_args(["--checkpoint", str(own_run), "--output", str(onnx_path),
                                                     "--check-images", "2"]))
    run_inference("--checkpoints", onnx_path, "--output", tmp_path / "onnx.csv")  # from the ONNX metadata
    assert list(utils.read_submission(tmp_path / "onnx.csv", 11)) == list(rows)

    manifest = run_pseudo_label("--checkpoints", own_run, "--out", tmp_path / "pseudo", "--threshold", "0",
                                "--allow-low-keep")
    assert manifest["source"]["data_root"] == str(tiny_demo)


@pytest.mark.slow
def test_a_run_whose_data_root_is_gone_names_the_flag(tiny_run, tmp_path, run_inference, constant_checkpoint):
    checkpoint = constant_checkpoint(tmp_path / "moved.pt", 1, data_root=str(tmp_path / "gone"))
    with pytest.raises(utils.UserError, match=r"trained on the data root .*gone, which does not exist here: pass "
                                              r"--data-root with the folder"):
        run_inference("--checkpoints", checkpoint, "--output", tmp_path / "s.csv")


@pytest.mark.slow
def test_photos_need_no_data_root(tmp_path, run_inference, constant_checkpoint, tiny_demo):
    checkpoint = constant_checkpoint(tmp_path / "moved.pt", 1, data_root=str(tmp_path / "gone"))
    run_inference("--checkpoints", checkpoint, "--images", tiny_demo / "batch_04_test", "--output",
                  tmp_path / "photos.csv")
    rows = utils.read_submission(tmp_path / "photos.csv", 11)
    assert sorted(rows) == sorted(path.name for path in (tiny_demo / "batch_04_test").iterdir())
    assert all((mask == 1).all() for mask in rows.values())  # the checkpoint's own predictions: label 1 everywhere


@pytest.mark.slow
def test_export_checks_on_the_runs_val_json_when_the_data_root_has_no_test_json(tiny_demo, constant_checkpoint,
                                                                                  tmp_path, no_demo, capsys):
    root = shutil.copytree(tiny_demo, tmp_path / "own")
    (root / "test.json").unlink()  # as in a dataset of one's own, split into train and val only
    checkpoint = constant_checkpoint(tmp_path / "own.pt", 1, data_root=str(root))
    onnx_path = tmp_path / "model.onnx"
    export.main(export.get_args_parser().parse_args(["--checkpoint", str(checkpoint), "--output", str(onnx_path),
                                                     "--check-images", "2"]))
    assert onnx_path.is_file()
    assert "val.json" in capsys.readouterr().out
