"""semi.py: known answers for the EMA teacher, the confidence mask, CutMix of images with their
pseudo-labels, the BatchNorm statistics of strong views, the unsupervised loss, its ramp-up and the resumable, sharded unlabelled stream."""
import json
import math
import os

import cv2
import numpy as np
import pytest
import torch

import images as imaging
import semi
import utils


def test_the_ema_teacher_copies_at_first_then_moves_by_the_warmed_up_decay_weights_and_buffers_alike():
    student = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    teacher = semi.ema_teacher(student, decay=0.9)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    teacher.update(student, step=1)  # decay 0 at the first step: a copy
    for key, value in student.state_dict().items():
        torch.testing.assert_close(teacher.module.state_dict()[key], value)
    before = {k: v.clone() for k, v in student.state_dict().items() if v.is_floating_point()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student[1].running_mean.fill_(5.0)
    teacher.update(student, step=8)  # warm-up decay 1 - (1 + 8 - 1)^(-2/3) = 0.75, under the cap
    after = student.state_dict()
    for key, old in before.items():
        torch.testing.assert_close(teacher.module.state_dict()[key], 0.75 * old + 0.25 * after[key])
    teacher.update(student, step=10_000)  # the warm-up decay 0.998 is capped at 0.9
    torch.testing.assert_close(teacher.module[1].running_mean, torch.full((2,), 0.9 * 1.25 + 0.1 * 5))


def test_pseudo_labels_keep_the_top_class_where_its_probability_reaches_the_threshold():
    # pixel 0: p = softmax([log 9, 0]) = (0.9, 0.1); pixel 1: (0.6, 0.4); pixel 2: (0.2, 0.8)
    logits = torch.log(torch.tensor([[0.9, 0.6, 0.2], [0.1, 0.4, 0.8]]))[None, :, None, :]
    masked, labels = semi.pseudo_labels(logits, threshold=0.75)
    assert labels.tolist() == [[[0, 0, 1]]]
    assert masked.tolist() == [[[0, utils.IGNORE_INDEX, 1]]]
    masked, _ = semi.pseudo_labels(logits, threshold=0.9)  # the threshold itself is kept
    assert masked.tolist() == [[[0, utils.IGNORE_INDEX, utils.IGNORE_INDEX]]]


def test_pseudo_labels_undo_the_class_weights_the_teacher_learnt_with():
    # the true probabilities p = (0.99, 0.01) under weights w = (0.1, 1) read q = w p / sum(w p) = (0.908, 0.092):
    # below 0.95 as they stand, 0.99 once divided by the weights
    weights = torch.tensor([0.1, 1.0])
    q = weights * torch.tensor([0.99, 0.01])
    logits = torch.log(q / q.sum())[None, :, None, None]
    assert semi.pseudo_labels(logits, 0.95)[0].item() == utils.IGNORE_INDEX
    assert semi.pseudo_labels(logits, 0.95, weights)[0].item() == 0
    # where q ties, the label is the class of the larger p: here the second, where the tie alone gives the first
    tie = torch.log(torch.tensor([0.5, 0.5]))[None, :, None, None]
    assert semi.pseudo_labels(tie, 0.0)[1].item() == 0
    assert semi.pseudo_labels(tie, 0.0, torch.tensor([1.0, 0.1]))[1].item() == 1


def test_cutmix_pastes_the_next_image_and_its_labels_inside_the_box_only():
    images = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1).expand(3, 2, 4, 4).clone()
    labels = torch.arange(3).view(3, 1, 1).expand(3, 4, 4).clone() + 10
    boxes = torch.zeros(3, 4, 4, dtype=torch.bool)
    boxes[0, 1:3, 1:3] = True  # image 0 takes image 1's pixels here
    boxes[2, 0, :] = True  # the last image takes the first's
    mixed, mixed_labels = semi.cutmix(images, labels, boxes)
    assert (mixed[0, :, 1:3, 1:3] == 1).all() and mixed[0].sum() == 2 * 4 * 1
    assert (mixed[1] == 1).all()
    assert (mixed[2, :, 0] == 0).all() and (mixed[2, :, 1:] == 2).all()
    assert (mixed_labels == torch.where(boxes, labels.roll(-1, 0), labels)).all()
    assert mixed_labels[0, 1, 1] == 11 and mixed_labels[0, 0, 0] == 10 and mixed_labels[2, 0, 0] == 10


def test_cutmix_boxes_follow_p_and_the_area_range_and_repeat_with_the_generator():
    boxes = semi.cutmix_boxes(200, 32, 48, torch.Generator().manual_seed(0), p=1.0)
    shares = boxes.float().mean((1, 2))
    assert (shares > 0).all()
    assert shares.min() >= 0.01 and shares.max() <= 0.45  # 0.02..0.4 up to rounding and the image's edge
    for box in boxes[:20]:  # each one rectangle
        rows, cols = box.any(1).nonzero(), box.any(0).nonzero()
        assert box.sum() == len(rows) * len(cols)
    assert not semi.cutmix_boxes(10, 8, 8, torch.Generator().manual_seed(0), p=0.0).any()
    again = semi.cutmix_boxes(200, 32, 48, torch.Generator().manual_seed(0), p=1.0)
    assert torch.equal(boxes, again)


def test_unsupervised_loss_counts_confident_pixels_and_divides_by_all():
    num_classes = 4
    logits = torch.zeros(1, num_classes, 2, 2)  # uniform: cross-entropy log(4) at every pixel
    targets = torch.full((1, 2, 2), utils.IGNORE_INDEX)
    assert semi.unsupervised_loss(logits, targets).item() == 0.0
    targets[0, 0, 0] = 2
    assert semi.unsupervised_loss(logits, targets).item() == pytest.approx(math.log(4) / 4)
    weights = torch.tensor([1.0, 1.0, 3.0, 1.0])
    assert semi.unsupervised_loss(logits, targets, weights).item() == pytest.approx(3 * math.log(4) / 4)


def test_strong_views_normalise_by_their_batch_but_leave_the_running_statistics_alone():
    layers = torch.nn.ModuleList([torch.nn.BatchNorm2d(1), torch.nn.BatchNorm2d(1, momentum=None)]).train()
    batch = torch.tensor([1.0, 3.0, 5.0, 7.0]).reshape(4, 1, 1, 1)  # mean 4, biased variance 5
    with semi.running_stats_frozen(layers):
        for layer in layers:
            torch.testing.assert_close(layer(batch), (batch - 4) / math.sqrt(5 + 1e-5))
    for layer in layers:
        assert layer.running_mean.item() == 0.0 and layer.running_var.item() == 1.0
        assert layer.num_batches_tracked.item() == 0
    assert layers[0].momentum == 0.1 and layers[1].momentum is None
    for layer in layers:  # outside, the running statistics move again
        layer(batch)
    assert layers[0].running_mean.item() == pytest.approx(0.4)  # 0.9 * 0 + 0.1 * 4
    assert layers[1].running_mean.item() == pytest.approx(4.0)  # cumulative, and this is its first batch


def test_rampup_rises_from_exp_minus_5_to_1_and_stays():
    assert semi.rampup(0, 100) == pytest.approx(math.exp(-5))
    assert semi.rampup(50, 100) == pytest.approx(math.exp(-5 * 0.25))
    assert semi.rampup(100, 100) == semi.rampup(500, 100) == 1.0
    assert semi.rampup(0, 0) == 1.0


def test_confident_share_per_class_and_nan_for_a_class_never_predicted():
    share = semi.ConfidentShare(3)
    labels = torch.tensor([[0, 0, 0, 1]])
    masked = torch.tensor([[0, utils.IGNORE_INDEX, 0, utils.IGNORE_INDEX]])
    share.update(masked, labels)
    result = share.shares()
    assert result[0] == pytest.approx(2 / 3) and result[1] == 0.0 and np.isnan(result[2])


def stream(size, per_epoch, epochs, replicas=1, rank=0, seed=0):
    sampler = semi.UnlabeledStreamSampler(size, per_epoch, num_replicas=replicas, rank=rank, seed=seed)
    keys = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        keys += list(sampler)
    return keys


def test_the_stream_visits_every_image_once_per_pass_and_reshuffles_between_passes():
    keys = stream(size=10, per_epoch=4, epochs=5)  # 20 draws: two passes
    first, second = [k[0] for k in keys[:10]], [k[0] for k in keys[10:]]
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second
    assert len({seed for _, seed in keys}) == 20  # each draw its own augmentation


def test_processes_draw_disjoint_images_within_a_pass():
    a = [index for index, _ in stream(size=12, per_epoch=3, epochs=2, replicas=2, rank=0)]
    b = [index for index, _ in stream(size=12, per_epoch=3, epochs=2, replicas=2, rank=1)]
    assert not set(a) & set(b) and sorted(a + b) == list(range(12))


def test_the_stream_resumed_mid_epoch_continues_exactly():
    sampler = semi.UnlabeledStreamSampler(7, 5, seed=3)
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.set_epoch(2, skip=3)
    assert len(sampler) == 2 and list(sampler) == whole[3:]


# ---------------------------------------------------------------- train.py --unlabeled and --ema
def test_unlabeled_photos_from_jsons_folders_and_files_skip_unreadable_ones(tiny_demo, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    cv2.imwrite(str(photos / "a.png"), np.full((20, 30, 3), 128, np.uint8))
    (photos / "broken.jpg").write_bytes(b"not an image")
    images, skipped = semi.find_unlabeled([tiny_demo / "test.json", photos], imaging.MAX_IMAGE_PIXELS)
    assert len(images) == 3 + 1 and len(skipped) == 1 and "broken.jpg" in skipped[0]
    assert all(os.path.isfile(info["path"]) for info in images)


@pytest.mark.slow
def test_validation_images_among_the_unlabeled_are_dropped_or_refused_with_strict(tiny_demo_copy, run_train,
                                                                                  tmp_path, capsys):
    unlabeled = ["--unlabeled", tiny_demo_copy / "test.json", tiny_demo_copy / "val.json"]
    with pytest.raises(utils.UserError, match=r"4 of the --unlabeled photos are validation images of .*val.json: "
                                              r"remove them from --unlabeled \(--strict refuses this\)"):
        run_train(tiny_demo_copy, "--epochs", 1, "--output", tmp_path / "strict", "--strict", *unlabeled)
    assert not (tmp_path / "strict").exists()
    run_train(tiny_demo_copy, "--epochs", 1, "--output", tmp_path / "run", *unlabeled)
    printed = capsys.readouterr().out
    assert "4 of the --unlabeled photos are validation images" in printed and "they are left out" in printed
    assert "unlabelled photos: 3; 2 beside each batch of 2 labelled images" in printed
    assert "unlabelled pixels the teacher is confident of" in printed


@pytest.mark.slow
def test_ema_is_validated_beside_the_model_and_best_pt_holds_the_better_weights(tiny_demo, run_train, tmp_path):
    run_train(tiny_demo, "--epochs", 2, "--val-every", 2, "--output", tmp_path, "--ema")  # one validation
    [record] = json.loads((tmp_path / "metrics.json").read_text())
    last = utils.load_checkpoint(tmp_path / utils.LAST_CHECKPOINT)
    best = utils.load_checkpoint(tmp_path / utils.BEST_CHECKPOINT)
    assert set(record["ema"]["iou"]) == set(record["iou"])
    assert last["best_miou"] == pytest.approx(max(record["miou"], record["ema"]["miou"]), abs=1e-6)
    expected = last["ema_state_dict"] if record["ema"]["miou"] > record["miou"] else last["state_dict"]
    for key, value in expected.items():
        assert torch.equal(best["state_dict"][key], value), key
    assert not all(torch.equal(last["state_dict"][k], v) for k, v in last["ema_state_dict"].items())


def test_label_next_benchmark_adds_the_picks_with_their_own_annotations(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import label_next

    full = {"categories": [{"id": 1, "name": "x"}],
            "images": [{"id": i, "file_name": f"{i}.jpg"} for i in (1, 2, 3, 4)],
            "annotations": [{"id": 10 * i, "image_id": i} for i in (1, 2, 3, 4)] + [{"id": 41, "image_id": 4}]}
    start = {**full, "images": full["images"][:1], "annotations": full["annotations"][:1]}
    grown = label_next.with_labels_of(start, full, {"4.jpg", "2.jpg"})
    assert [image["id"] for image in grown["images"]] == [1, 2, 4]
    assert sorted(a["id"] for a in grown["annotations"]) == [10, 20, 40, 41]
    assert grown["categories"] == full["categories"] and start["images"] == full["images"][:1]
    with pytest.raises(SystemExit, match="1 picked photos are not in the full json"):
        label_next.with_labels_of(start, full, {"4.jpg", "9.jpg"})
