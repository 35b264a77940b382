"""Rare-class levers: repeat-factor sampling, rare-class crops, OHEM cross-entropy, automatic class weights."""
import argparse
import itertools
import json
import math
import os
import subprocess
import sys

import albumentations as A
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dataset as data
import loss as losses
import presets
import train
import utils


# ---------------------------------------------------------------- a hand-made dataset
def rle(ones_from, ones, height=10, width=10):
    """An uncompressed RLE with `ones` pixels starting at column-major position `ones_from`: exact pixel counts."""
    return {"size": [height, width], "counts": [ones_from, ones, height * width - ones_from - ones]}


def write_json(tmp_path, annotations, n_images):
    coco = {"images": [{"id": i, "file_name": f"{i}.jpg", "height": 10, "width": 10} for i in range(1, n_images + 1)],
            "categories": [{"id": c, "name": f"class{c}"} for c in (1, 2, 3)],
            "annotations": [{"id": k, "image_id": image_id, "category_id": cat, "segmentation": seg}
                            for k, (image_id, cat, seg) in enumerate(annotations, start=1)]}
    (tmp_path / "train.json").write_text(json.dumps(coco))
    return data.SegmentationDataset(tmp_path, "train.json", "train", cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------- repeat factors
def test_repeat_factors_known_answer():
    # 5 images with known classes: f1 = 3/5, f2 = f3 = 1/5; the None image is not counted
    factors = data.repeat_factors([{1}, {1, 2}, {1}, {3}, set(), None], thresh=0.5)
    rare = math.sqrt(0.5 / 0.2)  # sqrt(t / f) for classes 2 and 3; class 1: sqrt(0.5 / 0.6) < 1 -> 1
    assert factors.tolist() == pytest.approx([1, rare, 1, rare, 1, 1])


def test_repeat_factors_of_a_coco_dataset_come_from_its_annotations(tmp_path):
    anns = [(1, 1, rle(0, 50)), (2, 1, rle(0, 50)), (3, 1, rle(0, 50)), (3, 2, rle(60, 10)), (4, 3, rle(0, 5))]
    train_set = write_json(tmp_path, anns, n_images=5)
    assert data.image_labels(train_set) == [{1}, {1}, {1, 2}, {3}, set()]
    parts = [train_set, list(range(3))]  # a part without a json (e.g. pseudo-labels) gets 1
    expected = [1, 1, math.sqrt(0.4 / 0.2), math.sqrt(0.4 / 0.2), 1, 1, 1, 1]
    assert data.concat_repeat_factors(parts, thresh=0.4).tolist() == pytest.approx(expected)


def test_repeat_threshold_must_be_positive():
    with pytest.raises(utils.UserError, match="--repeat-thresh must be above 0, not 0"):
        data.repeat_factors([{1}], thresh=0)


def sampler(factors, rank=0, num_replicas=1, seed=0):
    return data.RepeatFactorSampler(list(range(len(factors))), factors, num_replicas=num_replicas, rank=rank, seed=seed)


def test_whole_factors_repeat_exactly():
    s = sampler([1, 2, 3])
    for epoch in range(5):
        s.set_epoch(epoch)
        assert sorted(index for index, _ in s) == [0, 1, 1, 2, 2, 2]


def test_stochastic_rounding_gives_each_image_its_share_on_average():
    factors = np.array([1.0, 1.25, 2.5, 1.6])
    s, counts, epochs = sampler(factors), np.zeros(4), 3000
    for epoch in range(epochs):
        s.set_epoch(epoch)
        counts += np.bincount([index for index, _ in s], minlength=4)
    assert len(s) == round(factors.sum())
    np.testing.assert_allclose(counts / counts.sum(), factors / factors.sum(), atol=0.006)


def test_each_copy_of_an_image_gets_its_own_augmentation_seed():
    s = sampler([3.0, 3.0])
    seeds = [seed for _, seed in s]
    assert len(set(seeds)) == len(seeds) == 6


def test_shards_are_disjoint_and_complete_and_resume_skips_exactly():
    factors, world = np.array([1, 1.5, 2.2, 1, 3.7, 1, 1.1]), 3
    whole = sampler(factors)
    whole.set_epoch(4)
    shards = []
    for rank in range(world):
        shard = sampler(factors, rank=rank, num_replicas=world)
        shard.set_epoch(4)
        shards.append(list(shard))
    assert len({len(shard) for shard in shards}) == 1
    dealt = [pair[0] for pair in itertools.chain(*zip(*shards))]  # place p is rank p % world's (p // world)-th
    assert len(dealt) >= whole.epoch_length and dealt[:whole.epoch_length] == whole.epoch_indices().tolist()
    all_seeds = [seed for shard in shards for _, seed in shard]
    assert len(set(all_seeds)) == len(all_seeds)  # no draw is shared by two processes
    resumed = sampler(factors, rank=1, num_replicas=world)
    resumed.set_epoch(4, skip=2)
    assert list(resumed) == shards[1][2:] and len(resumed) == len(shards[1]) - 2


def test_epochs_differ_and_repeat_with_the_seed():
    def epoch_list(seed, epoch):
        s = sampler([1, 1.5, 2.5, 1.2], seed=seed)
        s.set_epoch(epoch)
        return list(s)
    assert epoch_list(0, 1) == epoch_list(0, 1)
    assert epoch_list(0, 1) != epoch_list(0, 2) and epoch_list(0, 1) != epoch_list(1, 1)


# ---------------------------------------------------------------- rare-class crops
def crop_test_mask():
    """Background fills the left 70 columns, class 1 the rest, class 5 a small square at the top right."""
    mask = np.zeros((100, 100), np.uint8)
    mask[:, 70:] = 1
    mask[5:11, 90:96] = 5
    mask[50:60, 0:10] = 255  # ignored: never counted
    return mask


def shares(mask):
    counts = np.bincount(mask.ravel(), minlength=256)[:255]
    return counts / counts.sum()


def candidates(seed, mask, tries):
    """The crops a plain RandomResizedCrop draws from the same seed, in order."""
    plain = A.RandomResizedCrop(size=(32, 32), scale=(0.1, 0.5))
    plain.set_random_seed(seed)
    return [plain.get_params_dependent_on_data({"shape": mask.shape}, {"mask": mask})["crop_coords"]
            for _ in range(tries)]


def take(mask, coords):
    x_min, y_min, x_max, y_max = coords
    return mask[y_min:y_max, x_min:x_max]


@pytest.mark.parametrize("seed", range(40))
def test_rare_crop_takes_the_first_candidate_within_the_ratio_holding_the_rare_class(seed):
    mask, tries, ratio = crop_test_mask(), 10, 0.75
    crop = presets.RareClassCrop(size=(32, 32), scale=(0.1, 0.5), rare_labels=[5], max_ratio=ratio, tries=tries)
    crop.set_random_seed(seed)
    chosen = crop.get_params_dependent_on_data({"shape": mask.shape}, {"mask": mask})["crop_coords"]
    drawn = candidates(seed, mask, tries)
    good = [c for c in drawn if shares(take(mask, c)).max() <= ratio and (take(mask, c) == 5).any()]
    if good:
        assert chosen == good[0]
    else:  # none qualifies: a rare one if any, then the one least filled by one class
        assert chosen == max(drawn, key=lambda c: ((take(mask, c) == 5).any(), -shares(take(mask, c)).max()))


def test_rare_crops_honour_the_ratio_far_more_often_than_plain_crops():
    mask, image = crop_test_mask(), np.zeros((100, 100, 3), np.uint8)
    plain = A.Compose([A.RandomResizedCrop(size=(32, 32), scale=(0.1, 0.5))])
    rare = A.Compose([presets.RareClassCrop(size=(32, 32), scale=(0.1, 0.5), rare_labels=[5], max_ratio=0.75)])

    def good_share(transform):
        results = []
        for seed in range(100):
            transform.set_random_seed(seed)
            results.append(shares(transform(image=image, mask=mask)["mask"]).max() <= 0.75)
        return np.mean(results)
    assert good_share(rare) > 0.9 > 0.5 > good_share(plain)


def test_rare_crop_without_rare_class_in_the_image_only_checks_the_ratio():
    mask = crop_test_mask()
    mask[mask == 5] = 1
    crop = presets.RareClassCrop(size=(32, 32), scale=(0.1, 0.5), rare_labels=[5], max_ratio=0.75)
    crop.set_random_seed(3)
    chosen = crop.get_params_dependent_on_data({"shape": mask.shape}, {"mask": mask})["crop_coords"]
    assert chosen == next(c for c in candidates(3, mask, 10) if shares(take(mask, c)).max() <= 0.75)


def test_rare_crop_is_repeatable_through_the_pipeline_seed():
    t = presets.build_transform("light", 32, crop_rare=dict(rare_labels=[5], max_ratio=0.75))
    image, mask = np.random.default_rng(0).integers(0, 256, (100, 100, 3), dtype=np.uint8), crop_test_mask()
    outputs = []
    for _ in range(2):
        t.set_random_seed(7)
        outputs.append(t(image=image, mask=mask))
    assert torch.equal(outputs[0]["image"], outputs[1]["image"]) and torch.equal(outputs[0]["mask"], outputs[1]["mask"])
    with pytest.raises(ValueError, match="light or strong"):
        presets.build_transform("none", 32, crop_rare=dict(rare_labels=[5]))


def test_crop_rare_classes_option_names_unknown_classes(tmp_path):
    train_set = write_json(tmp_path, [(1, 1, rle(0, 50)), (2, 3, rle(0, 5))], n_images=2)
    args = argparse.Namespace(crop_rare=True, crop_rare_classes="class3,Battery", crop_max_ratio=0.6)
    with pytest.raises(ValueError, match=r"--crop-rare-classes: unknown classes \['Battery'\]"):
        train.rare_crop_options(args, train_set)
    args.crop_rare_classes = None  # the two rarest by annotation count, as copy-paste picks them
    assert train.rare_crop_options(args, train_set) == dict(rare_labels=[1, 3], max_ratio=0.6)


# ---------------------------------------------------------------- OHEM
def two_class_logits(p_class0):
    """Logits (1, 2, 1, W) whose softmax gives class 0 the probabilities `p_class0`."""
    p = torch.tensor(p_class0, dtype=torch.float64)
    return torch.stack([p.log(), (1 - p).log()]).view(1, 2, 1, -1)


# true-class probabilities: 0.9, 0.5, 0.8, 0.4, (ignored), 0.65
LOGITS = two_class_logits([0.9, 0.5, 0.2, 0.6, 0.3, 0.65])
TARGET = torch.tensor([[[0, 0, 1, 1, 255, 0]]])


@pytest.mark.parametrize("min_kept, kept", [
    (0, [1, 3, 5]),            # under the threshold 0.7
    (4, [1, 2, 3, 5]),         # the 4 least confident: 0.4, 0.5, 0.65, 0.8
    (100, [0, 1, 2, 3, 5]),    # more than the batch has: every labelled pixel, never the ignored one
])
def test_ohem_keeps_exactly_the_hard_pixels(min_kept, kept):
    ohem = losses.OhemCELoss(thresh=0.7, min_kept=min_kept)
    hard = ohem.hard_target(LOGITS, TARGET)
    assert torch.nonzero(hard[0, 0] != 255).flatten().tolist() == kept
    true_prob = torch.tensor([0.9, 0.5, 0.8, 0.4, 1.0, 0.65], dtype=torch.float64)
    assert ohem(LOGITS, TARGET).item() == pytest.approx(-true_prob[kept].log().mean().item())


def test_ohem_min_kept_counts_per_image():
    logits, target = torch.cat([LOGITS, LOGITS]), torch.cat([TARGET, TARGET])
    hard = losses.OhemCELoss(thresh=0.1, min_kept=2).hard_target(logits, target)
    assert (hard != 255).sum() == 4  # 2 per image, the 0.4 and 0.5 pixels of both
    assert (hard[:, 0, [1, 3]] != 255).all()


def test_ohem_class_weights_give_weighted_mean_over_kept_pixels():
    weight = torch.tensor([1.0, 3.0], dtype=torch.float64)
    ohem = losses.OhemCELoss(weight=weight, thresh=0.7, min_kept=0)  # keeps 1 (class 0), 3 (class 1), 5 (class 0)
    expected = -(math.log(0.5) + 3 * math.log(0.4) + math.log(0.65)) / 5
    assert ohem(LOGITS, TARGET).item() == pytest.approx(expected)


def test_ohem_composes_with_other_terms_and_takes_its_options():
    logits, target = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
    combined = losses.build_loss("ohem:1,dice:0.5", 3, ohem_thresh=0.6, ohem_min_kept=5)
    ohem = losses.OhemCELoss(thresh=0.6, min_kept=5)
    expected = ohem(logits, target) + 0.5 * losses.DiceLoss()(logits, target)
    assert combined(logits, target).item() == pytest.approx(expected.item())
    assert (combined.terms["ohem"].thresh, combined.terms["ohem"].min_kept) == (0.6, 5)


def test_ohem_with_threshold_one_and_nothing_confident_is_plain_ce():
    logits, target = torch.randn(2, 4, 6, 6), torch.randint(0, 4, (2, 6, 6))
    target[0, :2] = 255
    ohem = losses.OhemCELoss(thresh=1.0, min_kept=0)
    assert ohem(logits, target).item() == pytest.approx(F.cross_entropy(logits, target, ignore_index=255).item())


def test_ohem_rejects_bad_options():
    with pytest.raises(utils.UserError, match=r"--ohem-thresh in \(0, 1\] and --ohem-min-kept >= 0, not 0 and"):
        losses.OhemCELoss(thresh=0)


# ---------------------------------------------------------------- automatic class weights
def test_auto_class_weights_of_a_dataset_follow_the_formula(tmp_path):
    # pixels: class 1 64 + class 2 4 painted on two 10x10 images; background the other 132; class 3 none
    train_set = write_json(tmp_path, [(1, 1, rle(0, 64)), (2, 2, rle(30, 4))], n_images=2)
    weights = train.resolve_class_weights("auto", train_set, 4)
    inverse_sqrt = [132 ** -0.5, 64 ** -0.5, 4 ** -0.5]
    cap = 10 * min(inverse_sqrt)  # an absent class gets the cap: 10x the most frequent class's weight
    mean = sum(inverse_sqrt) / 3  # normalised to mean 1 over the classes present
    expected = [w / mean for w in inverse_sqrt + [cap]]
    assert weights.tolist() == pytest.approx(expected, rel=1e-6)
    assert weights[3] / weights[0] == pytest.approx(10)


# ---------------------------------------------------------------- the benchmark over seeds
@pytest.mark.slow
def test_rare_classes_benchmark_prints_mean_and_spread_and_skips_finished_runs(tiny_demo, tiny_train_argv, tmp_path):
    out = tmp_path / "bench"
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "rare_classes.py")
    command = [sys.executable, script, "--out", str(out), "--seeds", "0", "1",
               "--configs", "baseline", "class-weights", "--", *tiny_train_argv(tiny_demo, "--epochs", "1")]
    first = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    mious = {config: [json.loads((out / config / f"seed{s}" / "metrics.json").read_text())[-1]["miou"] for s in (0, 1)]
             for config in ("baseline", "class-weights")}
    row = next(line for line in first.splitlines() if line.startswith("| mIoU |"))
    expected = " | ".join(f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}" for v in mious.values())
    assert row == f"| mIoU | {expected} |"
    assert sum(line.startswith("|") for line in first.splitlines()) == 2 + 11 + 1  # header, rule, classes, mIoU
    second = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    assert second.count("done already") == 4 and second.endswith(first[first.index("\nIoU at"):])
    command[command.index("--seeds") + 1:command.index("--configs")] = ["0", "1", "2", "--finished-only"]
    finished = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    assert "| class | baseline (seeds 0, 1) | class-weights (seeds 0, 1) |" in finished
    assert row in finished and not (out / "baseline" / "seed2").exists()


def test_the_defaults_are_the_measured_best_class_weights_on_copy_paste_off():
    """docs/rare-classes.md#the-defaults: on the demo set and trashbags alike."""
    args = train.get_args_parser().parse_args([])
    assert (args.class_weights, args.copy_paste_p) == ("auto", 0)
    assert train.parse_class_weights("none") is None and train.parse_class_weights("auto") == "auto"
