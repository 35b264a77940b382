"""Export a checkpoint to ONNX: uint8 RGB images in, class probabilities (or labels) out.

    python export.py --checkpoint runs/demo --output model.onnx              # at the training size
    python export.py --checkpoint runs/demo --output model.onnx --size 512 --labels
    python export.py --checkpoint runs/demo --output model.int8.onnx --int8 --calibration photos/ --eval-json val.json

The graph takes an N x 3 x H x W uint8 RGB batch at the export size (any N) and
holds the checkpoint's normalisation and its BatchNorms folded into the convs.
Its metadata describe the model as the checkpoint does (class names, palette,
input size, mean/std, model, encoder, paint order). Before the file is written
(atomically; an existing file is only replaced by a model that passed),
onnx.checker validates it and onnxruntime's output is compared with PyTorch's
on real images of the dataset.

--int8 writes that checked float graph quantized instead: onnxruntime static quantization (QDQ,
per-channel int8 weights, uint8 activations calibrated on --calibration photos fed as the ONNX
member feeds them). With --eval-json (a labelled json) the file is written only if its mIoU is
at most --max-miou-drop below the float graph's; without, the argmax agreement of the two on the
calibration photos is reported. The metadata say "precision": "int8" and hold those numbers.
"""
import argparse
import logging
import os
import tempfile

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quant_pre_process,
                                      quantize_static)

import coco_utils
import dataset as data
import ensemble as ensembles
import images as imaging
import model as models
import utils


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run folder (its best.pt)")
    p.add_argument("--output", required=True, help="ONNX file to write")
    p.add_argument("--size", type=int, default=None, help="input height and width (default: the training size)")
    p.add_argument("--labels", action="store_true", help="output the label map (N x H x W uint8), not probabilities")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--data-root", default=None,
                   help="dataset whose images check the export (default: the one the checkpoint was trained on, "
                        "else the demo set)")
    p.add_argument("--json", default=None,
                   help="images to check with, relative to --data-root (default: test.json, else the run's val or train json)")
    p.add_argument("--check-images", type=int, default=8, help="how many of its images to compare on")
    p.add_argument("--max-prob-diff", type=utils.non_negative_float, default=1e-4, help="largest allowed probability difference")
    p.add_argument("--min-agreement", type=utils.probability, default=0.999, help="smallest allowed argmax agreement")
    p.add_argument("--int8", action="store_true", help="write the model quantized to int8 (static, calibrated)")
    p.add_argument("--calibration", nargs="+", metavar="PATH",
                   help="with --int8: photos (files, folders, globs) or COCO jsons (images beside them) that "
                        "calibrate the activation ranges; photos like those the model will see")
    p.add_argument("--calibration-size", type=utils.positive_int, default=64,
                   help="at most this many calibration photos, spread evenly over those found")
    p.add_argument("--eval-json", default=None, metavar="JSON",
                   help="with --int8: a labelled json under --data-root (e.g. val.json) on which float and int8 "
                        "mIoU are compared (default: only their agreement on the calibration photos is reported)")
    p.add_argument("--max-miou-drop", type=float, default=0.01,
                   help="with --eval-json: the largest mIoU loss of the int8 model allowed (a negative limit refuses every file: a check of the gate)")
    return p


class ExportedModel(torch.nn.Module):
    """uint8 RGB N x 3 x H x W -> softmax probabilities N x C x H x W (or uint8 labels N x H x W)."""

    def __init__(self, net, mean, std, labels=False):
        super().__init__()
        self.net = net
        # x / 255 normalised by mean and std, folded into one subtraction and one division
        self.register_buffer("mean", 255 * torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", 255 * torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.labels = labels

    def forward(self, images):
        logits = self.net((images.float() - self.mean) / self.std).float()
        if self.labels:
            return logits.argmax(1).to(torch.uint8)
        # written out: onnxruntime's Softmax over the channel axis of NCHW is slow (a fifth of a UNet's
        # time at 512 px), and its graph optimiser turns transpose -> Softmax(last axis) -> transpose
        # back into that; ReduceMax, Exp, ReduceSum and Div over the channels take a tenth of it
        exp = (logits - logits.amax(1, keepdim=True)).exp()
        return exp / exp.sum(1, keepdim=True)


def load_net(checkpoint):
    net = models.create_model(checkpoint["model"], checkpoint["encoder"], checkpoint["num_classes"],
                              **checkpoint["model_kwargs"])
    net.load_state_dict(checkpoint["state_dict"])
    return net.eval()


def export_onnx(module, size, opset=None):
    """The module as an ONNX ModelProto, batch size free, height and width fixed at `size`.

    dynamo=True: the torch.export-based exporter. The TorchScript one (dynamo=False) is deprecated
    since torch 2.9 and cannot export adaptive pooling to sizes that do not divide the input
    (UperNet's pyramid pooling); torch.export decomposes it exactly.
    """
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)  # batch 2: a batch of 1 would be specialised
    # onnxscript's optimizer warns of each Split it leaves unfolded: noise to the user, the graph is right
    logging.getLogger("onnxscript.optimizer").setLevel(logging.ERROR)
    program = torch.onnx.export(module, (example,), dynamo=True, input_names=["images"],
                                output_names=["labels" if module.labels else "probabilities"],
                                dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=opset,
                                verbose=False)
    return program.model_proto


def paint_order_of(checkpoint):
    """The overlap rule of the masks the checkpoint learned from (None when it does not say)."""
    return checkpoint.get("paint_order", checkpoint.get("args", {}).get("paint_order"))


def description(checkpoint, size, labels):
    """What the ONNX file says about itself: the checkpoint's description, the input and the output."""
    return {
        "model": checkpoint["model"], "encoder": checkpoint["encoder"], "model_kwargs": checkpoint["model_kwargs"],
        "num_classes": checkpoint["num_classes"], "class_names": checkpoint["class_names"],
        "palette": utils.class_palette(checkpoint["num_classes"]).tolist(),
        "image_size": checkpoint["image_size"], "input_size": [size, size],
        "train_image_size": checkpoint.get("train_image_size"),  # --tile alone's window; None before it was recorded
        "mean": list(checkpoint["mean"]), "std": list(checkpoint["std"]),
        "paint_order": paint_order_of(checkpoint),
        "class_weights": checkpoint.get("class_weights"),  # what pseudo_label.py undoes; None without
        "data_root": checkpoint.get("args", {}).get("data_root"),  # where inference.py finds its jsons by default
        "input": "uint8 RGB, N x 3 x H x W", "output": "labels" if labels else "probabilities",
    }


def check_int8_flags(args):
    if not args.int8:
        given = [flag for flag, value in (("--calibration", args.calibration), ("--eval-json", args.eval_json))
                 if value is not None]
        if given:
            raise utils.UserError(f"{' and '.join(given)} only apply to an int8 export: add --int8, or leave them out")
        return
    if args.labels:
        raise utils.UserError("--int8 writes a probabilities model (inference.py and serve.py take those): "
                              "leave out --labels")
    if not args.calibration:
        raise utils.UserError("--int8 needs --calibration PATH [PATH ...]: photos (folders, globs or a COCO json) "
                              "like those the model will see, to calibrate the activation ranges")


def calibration_paths(patterns, count):
    """Up to `count` readable photos of the files, folders, globs and COCO jsons given, spread evenly."""
    found = dict(coco_utils.find_photos(patterns))  # a photo named twice is calibrated on once
    images, _ = imaging.readable_images(sorted(found.items()), imaging.MAX_IMAGE_PIXELS, patterns)
    picks = np.linspace(0, len(images) - 1, min(count, len(images))).round().astype(int)
    return [images[i]["path"] for i in picks]


def model_inputs(paths, size):
    """Photos as an ONNX member feeds them (ensemble.OnnxMember): resized to size x size, rounded to uint8."""
    inputs = []
    for path in paths:
        image = torch.from_numpy(imaging.read_image(path)).permute(2, 0, 1)[None]
        inputs.append(ensembles.resize_rows(image, (size, size)).mul_(255).round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(inputs).numpy()


def labelled_set(args, checkpoint, source):
    """The --eval-json images with their label masks (painted as the model learned), checked to hold
    annotations of the model's classes."""
    coco_utils.require_json(args.data_root, args.eval_json, "--eval-json")
    dataset = data.SegmentationDataset(args.data_root, args.eval_json, "val", ensembles.image_tensor_transform(),
                                       paint_order=paint_order_of(checkpoint) or "area")
    if not any(dataset.coco.anns_by_image.values()):
        raise utils.UserError(f"{dataset.coco.path} holds no annotations: pass --eval-json with a labelled json "
                              f"(e.g. val.json), or leave it out to check on the calibration photos")
    coco_utils.check_same_classes(dataset.coco.path, dataset.class_names, source, checkpoint["class_names"],
                            fix="pass an --eval-json labelled with the checkpoint's classes")
    return dataset


def check_json(data_root, run_args):
    """test.json, else the run's val or train json: any photos check an export, and a dataset of one's
    own may have no test split."""
    names = [name for name in ("test.json", run_args.get("val_json"), run_args.get("train_json")) if name]
    for name in names:
        if os.path.isfile(os.path.join(data_root, name)):
            return name
    raise utils.UserError(f"none of {names} is in {data_root}: pass --json with a json of photos to check the "
                          f"export with")


def check_images(data_root, json_name, count, size):
    """The first `count` images of the json, resized to the export size: uint8 N x 3 x size x size."""
    coco = coco_utils.Coco(os.path.join(data_root, json_name), data_root, expect_annotations=False)
    images = [cv2.resize(imaging.read_image(coco.image_path(info)), (size, size), interpolation=cv2.INTER_AREA)
              for info in coco.images[:count]]
    if not images:
        raise utils.UserError(f"{os.path.join(data_root, json_name)} lists no images to check the export with")
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def compare(reference_probs, onnx_output, labels):
    """(max abs probability difference or None for a labels model, fraction of pixels with the same argmax)."""
    expected = reference_probs.argmax(1).numpy()
    if labels:
        return None, float((onnx_output == expected).mean())
    return float(np.abs(onnx_output - reference_probs.numpy()).max()), float((onnx_output.argmax(1) == expected).mean())


def verify(path, images, reference_probs, labels, max_prob_diff, min_agreement, target):
    """Raise a UserError saying by how much onnxruntime's output on `images` misses PyTorch's."""
    onnx.checker.check_model(path, full_check=True)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    output = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    diff, agreement = compare(reference_probs, output, labels)
    problems = []
    if diff is not None and diff > max_prob_diff:
        problems.append(f"probabilities differ by up to {diff:.3g} (limit {max_prob_diff:g})")
    if agreement < min_agreement:
        problems.append(f"labels agree on {100 * agreement:.3f} % of pixels (limit {100 * min_agreement:g} %)")
    if problems:
        raise utils.UserError(f"refusing to write {target}: onnxruntime and PyTorch disagree on {len(images)} "
                              f"images: {'; '.join(problems)}; any existing file is kept")
    return diff, agreement


class CalibrationPhotos(CalibrationDataReader):
    """uint8 model inputs for quantize_static, a few photos a batch."""

    def __init__(self, inputs, batch_size=8):
        self.batches = iter([{"images": inputs[i:i + batch_size]} for i in range(0, len(inputs), batch_size)])

    def get_next(self):
        return next(self.batches, None)


# quantized: the convolutions and what joins them, the activations too (SiLU is Sigmoid and Mul; a float
# op between int8 ones costs a DequantizeLinear and a QuantizeLinear); the softmax stays float, so the
# probabilities keep their resolution for ensembles and near ties. onnxruntime's CPU provider has no
# int8 ConvTranspose (the decoders' fused upsampling): it stays float between its Q/DQ pairs
QUANTIZED_OPS = ["Conv", "ConvTranspose", "Add", "Mul", "Sigmoid", "Relu", "MaxPool", "Resize", "Concat"]


def quantize(float_path, int8_path, inputs, folder):
    """The float ONNX file at float_path quantized to int8_path, activation ranges from `inputs`.

    Per-channel int8 weights and uint8 activations in QDQ form (onnxruntime's CPU kernels fuse each
    DequantizeLinear -> op -> QuantizeLinear into one int8 op). quant_pre_process first infers
    shapes and folds constants (the weights of the decoders' fused upsampling); BatchNorm is
    already folded into the convs by the export. ONNX's shape inference suffices for these graphs;
    onnxruntime's symbolic one (meant for transformers' dynamic dims) fails on some of them.
    """
    prepared = os.path.join(folder, "prepared.onnx")
    quant_pre_process(float_path, prepared, skip_symbolic_shape=True)
    quantize_static(prepared, int8_path, CalibrationPhotos(inputs), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=QUANTIZED_OPS)


def miou(described, dataset):
    """mIoU of an ONNX model (open_onnx's description) on a labelled dataset, predicted as inference.py does."""
    ensemble, class_names = ensembles.build_ensemble([described["path"]], [described], "cpu")
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=data.collate_mixed)
    confusion = utils.ConfusionMatrix(len(class_names))
    for index, labels in ensembles.predict(ensemble, loader, "cpu"):
        confusion.update(torch.from_numpy(dataset.label_mask(index)), labels)
    return confusion.compute()["miou"]


def labels(described, feed):
    """An ONNX model's labels (N x H x W) for one feed of uint8 images."""
    return described["session"].run(None, feed)[0].argmax(1)


def int8_check(float_path, int8_path, inputs, labelled, args):
    """The int8 model against the float one: mIoU on the labelled set (refused beyond --max-miou-drop), else
    the argmax agreement on the calibration inputs. The numbers, for the metadata."""
    float_model, int8_model = ensembles.open_onnx(float_path), ensembles.open_onnx(int8_path)
    if labelled is None:
        same = sum(int((labels(float_model, batch) == labels(int8_model, batch)).sum())
                   for batch in CalibrationPhotos(inputs).batches)
        return {"calibration_photos": len(inputs), "argmax_agreement": same / (inputs.size // 3)}
    scores = {"eval_json": args.eval_json, "eval_images": len(labelled),
              "float_miou": miou(float_model, labelled), "int8_miou": miou(int8_model, labelled),
              "max_miou_drop": args.max_miou_drop}
    drop = scores["float_miou"] - scores["int8_miou"]
    if drop > args.max_miou_drop:
        raise utils.UserError(f"refusing to write {args.output}: int8 mIoU {scores['int8_miou']:.4f} against float "
                              f"{scores['float_miou']:.4f} on {args.eval_json} ({len(labelled)} images), a drop of "
                              f"{drop:.4f} above --max-miou-drop {args.max_miou_drop:g}; any existing file is kept: "
                              f"calibrate on more photos like these (--calibration-size), or deploy the float export")
    return scores


def write_int8(args, float_proto, meta, images, reference_probs, calibration, labelled):
    """Check the float graph as a float export is checked, quantize it, gate it, write it. The gate's numbers."""
    with tempfile.TemporaryDirectory() as folder:
        float_path, int8_path = os.path.join(folder, "float.onnx"), os.path.join(folder, "int8.onnx")
        onnx.save(float_proto, float_path)
        verify(float_path, images, reference_probs, False, args.max_prob_diff, args.min_agreement, args.output)
        inputs = model_inputs(calibration, meta["input_size"][0])
        quantize(float_path, int8_path, inputs, folder)
        int8_proto = onnx.load(int8_path)
        meta = {**meta, "precision": "int8", "calibration_photos": len(inputs)}
        onnx.helper.set_model_props(int8_proto, ensembles.onnx_metadata(meta))
        onnx.save(int8_proto, int8_path)
        check = int8_check(float_path, int8_path, inputs, labelled, args)
    onnx.helper.set_model_props(int8_proto, ensembles.onnx_metadata({**meta, "int8_check": check}))

    def loads(tmp):
        onnx.checker.check_model(tmp, full_check=True)
        ensembles.open_onnx(tmp)

    with utils.atomic_open(args.output, "wb", validate=loads) as f:
        f.write(int8_proto.SerializeToString())
    return check


def int8_summary(check):
    if "int8_miou" in check:
        return (f"mIoU on {check['eval_json']} ({check['eval_images']} images): float {check['float_miou']:.4f}, "
                f"int8 {check['int8_miou']:.4f} (a drop of {check['float_miou'] - check['int8_miou']:.4f}, "
                f"--max-miou-drop {check['max_miou_drop']:g})")
    return (f"argmax agreement with the float model on the {check['calibration_photos']} calibration photos "
            f"{100 * check['argmax_agreement']:.3f} % (mIoU not checked: pass --eval-json with a labelled json)")


def main(args):
    check_int8_flags(args)
    path = ensembles.expand_checkpoints([args.checkpoint])[0]
    checkpoint = utils.load_checkpoint(path, required_keys=utils.MODEL_KEYS)
    size = args.size or checkpoint["image_size"]
    args.data_root = ensembles.run_data_root(args.data_root, [checkpoint.get("args", {}).get("data_root")])
    data.prepare_data_root(args.data_root)
    json_name = args.json or check_json(args.data_root, checkpoint.get("args", {}))
    images = check_images(args.data_root, json_name, args.check_images, size)
    if args.int8:  # every photo and json found before any work
        calibration = calibration_paths(args.calibration, args.calibration_size)
        labelled = labelled_set(args, checkpoint, path) if args.eval_json else None
    with torch.inference_mode():  # the reference: the checkpoint's own model, BatchNorm not folded
        reference = ensembles.NormalisedSoftmax(load_net(checkpoint), checkpoint["mean"], checkpoint["std"])
        reference_probs = reference(images.float() / 255)
    module = ExportedModel(ensembles.prepare_for_inference(load_net(checkpoint)), checkpoint["mean"],
                           checkpoint["std"], args.labels).eval()
    proto = export_onnx(module, size, args.opset)
    meta = {**description(checkpoint, size, args.labels), "precision": "float32"}
    onnx.helper.set_model_props(proto, ensembles.onnx_metadata(meta))
    if args.int8:
        gate = write_int8(args, proto, meta, images, reference_probs, calibration, labelled)
        print(f"wrote {args.output} ({size}x{size}, int8, calibrated on {len(calibration)} photos) "
              f"from {path}; {int8_summary(gate)}")
        return {"int8": gate}
    result = {}

    def check(tmp):
        result["diff"], result["agreement"] = verify(tmp, images, reference_probs, args.labels,
                                                     args.max_prob_diff, args.min_agreement, args.output)

    with utils.atomic_open(args.output, "wb", validate=check) as f:
        f.write(proto.SerializeToString())
    diff = "" if result["diff"] is None else f"max probability difference {result['diff']:.2g}, "
    print(f"wrote {args.output} ({size}x{size}, {'labels' if args.labels else 'probabilities'}) from {path}; "
          f"onnxruntime vs PyTorch on {len(images)} images of {json_name}: {diff}"
          f"argmax agreement {100 * result['agreement']:.3f} %")
    return result


if __name__ == "__main__":
    utils.run_main(main, get_args_parser())
