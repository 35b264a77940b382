"""A run folder holds one run, and a run that cannot start leaves it as it was (issue #29, round two).

--overwrite deletes the old run only once the new one has passed its checks; a checkpoint of another
folder never replaces a run; one process at a time writes a run folder (its lock); missing or resized
images, another optimizer, --fold with the two jsons and out-of-memory stop the run at start-up with
one line; last.pt is saved before validation.
"""
import json
import os
import shutil
import subprocess

import cv2
import pytest
import torch

import train
import utils


def snapshot(folder):
    """{path relative to folder: bytes} of every file under it."""
    files = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(parent, name), "rb") as f:
                files[os.path.relpath(os.path.join(parent, name), folder)] = f.read()
    return files


@pytest.fixture
def old_run(tiny_run, tmp_path):
    """A copy of the one-epoch tiny run that the test may change."""
    return shutil.copytree(tiny_run, tmp_path / "old-run")


def epoch_of(path):
    return torch.load(path, weights_only=True)["epoch"]


def fail(*args, **kwargs):
    raise RuntimeError("failed on purpose")


# ---------------------------------------------------------------- 2. --overwrite deletes only once the run can start
@pytest.mark.slow
def test_an_overwrite_that_cannot_start_leaves_the_old_run_byte_identical(tiny_demo, old_run, run_train, tmp_path,
                                                                          monkeypatch):
    before = snapshot(old_run)
    with pytest.raises(utils.UserError, match="pass --data-root"):
        run_train(tmp_path / "typo", "--output", old_run, "--overwrite")
    assert snapshot(old_run) == before

    monkeypatch.setattr(train, "preflight", fail)  # everything built, the last check fails
    with pytest.raises(RuntimeError, match="failed on purpose"):
        run_train(tiny_demo, "--output", old_run, "--overwrite", "--epochs", 1)
    assert snapshot(old_run) == before


# ---------------------------------------------------------------- 3. --resume of another folder's checkpoint
@pytest.mark.slow
def test_a_checkpoint_of_another_run_folder_never_replaces_a_run(tiny_demo, tiny_run, run_train, tmp_path):
    a, b = (shutil.copytree(tiny_run, tmp_path / name) for name in ("a", "b"))
    before = snapshot(a)
    with pytest.raises(utils.UserError) as refusal:
        run_train(tiny_demo, "--output", a, "--resume", b / utils.LAST_CHECKPOINT, "--epochs", 2)
    assert str(refusal.value) == (
        f"--resume {b / utils.LAST_CHECKPOINT} is a checkpoint of the run in {b}, but --output {a} holds another run "
        f"(last.pt, best.pt) whose checkpoints and metrics it would replace: pass --output {b} to continue that run, "
        f"or an --output without a run to branch off it")
    assert snapshot(a) == before

    branch = tmp_path / "branch"  # a folder without a run may start a branch; nothing left to train here
    run_train(tiny_demo, "--output", branch, "--resume", b / utils.LAST_CHECKPOINT, "--epochs", 1)
    assert json.loads((branch / "args.json").read_text())["resume"] == str(b / utils.LAST_CHECKPOINT)
    run_train(tiny_demo, "--output", b, "--resume", b / utils.LAST_CHECKPOINT, "--epochs", 2)  # its own folder
    assert epoch_of(b / utils.LAST_CHECKPOINT) == 2


# ---------------------------------------------------------------- 4. one process at a time in a run folder
def write_lock(folder, host, pid):
    folder.mkdir(exist_ok=True)
    (folder / utils.RUN_LOCK).write_text(json.dumps({"host": host, "pid": pid}))


def test_a_run_folder_in_use_is_refused(tiny_demo, run_train, tmp_path):
    output, lock = tmp_path / "run", tmp_path / "run" / utils.RUN_LOCK
    holder = subprocess.Popen(["sleep", "60"])  # a live process of this host
    try:
        write_lock(output, utils._HOST, holder.pid)
        with pytest.raises(utils.UserError) as refusal:
            run_train(tiny_demo, "--output", output, "--epochs", 1)
        assert str(refusal.value) == (
            f"the run folder {output} is in use by process {holder.pid} of this host (lock file {lock}): wait for "
            f"that run to end, or pass another --output; if process {holder.pid} is no run (its pid reused), delete "
            f"the lock file")
        assert os.listdir(output) == [utils.RUN_LOCK]  # nothing written, the holder's lock kept
    finally:
        holder.kill()
        holder.wait()

    write_lock(output, "otherhost", 1)  # a process this host cannot see
    with pytest.raises(utils.UserError, match=f"in use by process 1 on host otherhost \\(lock file {lock}\\)"):
        run_train(tiny_demo, "--output", output, "--epochs", 1)
    assert json.loads(lock.read_text()) == {"host": "otherhost", "pid": 1}


@pytest.mark.slow
def test_a_dead_processs_lock_is_taken_over_and_a_run_removes_its_own(tiny_demo, run_train, tmp_path, monkeypatch,
                                                                      capsys):
    output, lock = tmp_path / "run", tmp_path / "run" / utils.RUN_LOCK
    dead = subprocess.Popen(["true"])
    dead.wait()
    write_lock(output, utils._HOST, dead.pid)
    held, real_preflight = [], train.preflight

    def preflight(*args, **kwargs):
        held.append(json.loads(lock.read_text()))
        return real_preflight(*args, **kwargs)

    monkeypatch.setattr(train, "preflight", preflight)
    run_train(tiny_demo, "--output", output, "--epochs", 1)
    assert f"taking over the lock {lock} of process {dead.pid}, which is no longer running" in capsys.readouterr().out
    assert held == [{"host": utils._HOST, "pid": os.getpid()}]
    assert not lock.exists() and epoch_of(output / utils.LAST_CHECKPOINT) == 1

    refused = tmp_path / "refused"  # a refused run leaves neither its lock nor the folder made for it
    with pytest.raises(utils.UserError):
        run_train(tmp_path / "typo", "--output", refused)
    assert not refused.exists()


# ---------------------------------------------------------------- 5. images checked at start-up; last.pt before validation
def test_missing_and_resized_images_stop_the_run_before_training(tiny_demo_copy, run_train, tmp_path):
    root = tiny_demo_copy
    val = json.loads((root / "val.json").read_text())["images"]
    for image in val[:2]:
        os.remove(root / image["file_name"])
    with pytest.raises(utils.UserError) as refusal:
        run_train(root, "--output", tmp_path / "run", "--epochs", 1)
    first = root / val[0]["file_name"]
    assert str(refusal.value).startswith(f"{root / 'val.json'}: 2 of the {len(val)} images read from it are missing, "
                                         f"unreadable or not the size listed: image file {first} does not exist; ")
    assert not (tmp_path / "run").exists()

    train_images = json.loads((root / "train.json").read_text())["images"]
    for image in train_images:  # every training image resized: the first three are named, then the count
        path = root / image["file_name"]
        cv2.imwrite(str(path), cv2.resize(cv2.imread(str(path)), (48, 64)))
    message = f"{root / 'train.json'}: {len(train_images)} of the {len(train_images)} images"
    with pytest.raises(utils.UserError, match=message) as refusal:
        run_train(root, "--output", tmp_path / "run", "--epochs", 1)
    first = root / train_images[0]["file_name"]
    assert (f"image file {first} is 48x64 (WxH) but the json says 64x64 (it has no EXIF rotation): fix the json's "
            f"width and height, or use the file the json was made for; ") in str(refusal.value)
    assert str(refusal.value).endswith(f"; and {len(train_images) - 3} more")


def test_a_missing_extra_json_image_stops_the_run_before_training(tiny_demo_copy, run_train, tmp_path):
    root = tiny_demo_copy
    coco = json.loads((root / "train.json").read_text())
    coco["images"][0]["file_name"] = "batch_03/missing.jpg"
    utils.atomic_write_json(root / "extra.json", coco)
    with pytest.raises(utils.UserError) as refusal:
        run_train(root, "--output", tmp_path / "run", "--epochs", 1, "--extra-json", root / "extra.json")
    assert str(refusal.value).startswith(f"{root / 'extra.json'}: 1 of the {len(coco['images'])} images read from it "
                                         f"are missing, unreadable or not the size listed: image file "
                                         f"{root / 'batch_03/missing.jpg'} does not exist")


@pytest.mark.slow
def test_last_pt_is_saved_before_validation(tiny_demo, run_train, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "evaluate", fail)
    with pytest.raises(RuntimeError, match="failed on purpose"):
        run_train(tiny_demo, "--output", tmp_path / "run", "--epochs", 1, "--no-preflight")
    assert epoch_of(tmp_path / "run" / utils.LAST_CHECKPOINT) == 1  # the epoch's training is kept


# ---------------------------------------------------------------- 7. another optimizer; args.json once the run starts
@pytest.mark.slow
def test_resume_with_another_optimizer_is_refused_and_keeps_args_json(tiny_demo, old_run, run_train, monkeypatch):
    args_json = (old_run / "args.json").read_bytes()
    with pytest.raises(utils.UserError) as refusal:
        run_train(tiny_demo, "--output", old_run, "--resume", "--epochs", 2, "--optimizer", "adamw")
    assert str(refusal.value) == (
        f"{old_run / utils.LAST_CHECKPOINT} was trained with --optimizer radam, this run asks for --optimizer adamw, "
        f"whose state the checkpoint lacks: resume with --optimizer radam, or drop --resume and pass another --output")
    assert (old_run / "args.json").read_bytes() == args_json

    monkeypatch.setattr(train, "preflight", fail)  # a start that fails at its last check
    with pytest.raises(RuntimeError, match="failed on purpose"):
        run_train(tiny_demo, "--output", old_run, "--resume", "--epochs", 2)
    assert (old_run / "args.json").read_bytes() == args_json


# ---------------------------------------------------------------- 12. --fold with --train-json or --val-json
@pytest.mark.parametrize("flag", ["--train-json", "--val-json"])
def test_fold_with_a_json_of_the_train_val_split_is_refused(tiny_demo, run_train, tmp_path, flag):
    with pytest.raises(utils.UserError) as refusal:
        run_train(tiny_demo, "--output", tmp_path / "run", "--epochs", 1, "--fold", 0, flag, "nowhere.json")
    assert str(refusal.value) == (f"--fold splits --all-json (train_all.json) into training and validation images, "
                                  f"so {flag} nowhere.json would be ignored: drop --train-json/--val-json to train on "
                                  f"the fold, or drop --fold to train on those jsons")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- 13. out of memory in the preflight
@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you tried to "
                 "allocate 8589934592 bytes."),
    RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 8589934592 bytes. Error code 12 (Cannot allocate memory)"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB"),
], ids=["cpu-not-enough", "cpu-cannot-allocate", "cuda"])
def test_out_of_memory_in_the_preflight_names_size_and_batch_size(tiny_demo, run_train, tmp_path, monkeypatch, error):
    def out_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(train, "evaluate", out_of_memory)
    with pytest.raises(utils.UserError) as refusal:
        run_train(tiny_demo, "--output", tmp_path / "run", "--epochs", 1)
    assert str(refusal.value) == ("out of memory on cpu in the preflight at --size 64 with --batch-size 2: pass a "
                                  "smaller --size or --batch-size (--accum-steps N keeps the batch per optimizer step)")
    assert not (tmp_path / "run").exists()


def test_other_runtime_errors_in_the_preflight_keep_their_traceback(tiny_demo, run_train, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "evaluate", fail)
    with pytest.raises(RuntimeError, match="failed on purpose"):
        run_train(tiny_demo, "--output", tmp_path / "run", "--epochs", 1)
