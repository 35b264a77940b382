"""Export a checkpoint to ONNX: uint8 RGB images in, class probabilities (or labels) out.

    python export.py --checkpoint runs/demo --output model.onnx              # at the training size
    python export.py --checkpoint runs/demo --output model.onnx --size 512 --labels

The graph takes an N x 3 x H x W uint8 RGB batch at the export size (any N) and
holds the checkpoint's normalisation and its BatchNorms folded into the convs.
Its metadata describe the model as the checkpoint does (class names, palette,
input size, mean/std, model, encoder, paint order). Before the file is written
(atomically; an existing file is only replaced by a model that passed),
onnx.checker validates it and onnxruntime's output is compared with PyTorch's
on real images of the dataset.
"""
import argparse
import os

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import torch

import dataset as data
import ensemble as ensembles
import model as models
import utils


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run folder (its best.pt)")
    p.add_argument("--output", required=True, help="ONNX file to write")
    p.add_argument("--size", type=int, default=None, help="input height and width (default: the training size)")
    p.add_argument("--labels", action="store_true", help="output the label map (N x H x W uint8), not probabilities")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--data-root", default=data.DEFAULT_DATA_ROOT, help="dataset whose images check the export")
    p.add_argument("--json", default="test.json", help="images to check with, relative to --data-root")
    p.add_argument("--check-images", type=int, default=8, help="how many of its images to compare on")
    p.add_argument("--max-prob-diff", type=float, default=1e-4, help="largest allowed probability difference")
    p.add_argument("--min-agreement", type=float, default=0.999, help="smallest allowed argmax agreement")
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
        # onnxruntime's Softmax over the channel axis of NCHW is slow (about a third of the graph's time
        # at 512 px); over the last axis of NHWC it is fast, and the two transposes cost little
        return logits.permute(0, 2, 3, 1).softmax(-1).permute(0, 3, 1, 2)


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
    program = torch.onnx.export(module, (example,), dynamo=True, input_names=["images"],
                                output_names=["labels" if module.labels else "probabilities"],
                                dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=opset,
                                verbose=False)
    return program.model_proto


def description(checkpoint, size, labels):
    """What the ONNX file says about itself: the checkpoint's description, the input and the output."""
    return {
        "model": checkpoint["model"], "encoder": checkpoint["encoder"], "model_kwargs": checkpoint["model_kwargs"],
        "num_classes": checkpoint["num_classes"], "class_names": checkpoint["class_names"],
        "palette": utils.class_palette(checkpoint["num_classes"]).tolist(),
        "image_size": checkpoint["image_size"], "input_size": [size, size],
        "mean": list(checkpoint["mean"]), "std": list(checkpoint["std"]),
        "paint_order": checkpoint.get("paint_order", checkpoint.get("args", {}).get("paint_order")),
        "input": "uint8 RGB, N x 3 x H x W", "output": "labels" if labels else "probabilities",
    }


def check_images(data_root, json_name, count, size):
    """The first `count` images of the json, resized to the export size: uint8 N x 3 x size x size."""
    coco = data.Coco(os.path.join(data_root, json_name), data_root, expect_annotations=False)
    images = [cv2.resize(data.read_image(coco.image_path(info)), (size, size), interpolation=cv2.INTER_AREA)
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


def main(args):
    path = ensembles.expand_checkpoints([args.checkpoint])[0]
    checkpoint = utils.load_checkpoint(path, required_keys=utils.MODEL_KEYS)
    size = args.size or checkpoint["image_size"]
    data.prepare_data_root(args.data_root)
    images = check_images(args.data_root, args.json, args.check_images, size)
    with torch.inference_mode():  # the reference: the checkpoint's own model, BatchNorm not folded
        reference = ensembles.NormalisedSoftmax(load_net(checkpoint), checkpoint["mean"], checkpoint["std"])
        reference_probs = reference(images.float() / 255)
    module = ExportedModel(ensembles.prepare_for_inference(load_net(checkpoint)), checkpoint["mean"],
                           checkpoint["std"], args.labels).eval()
    proto = export_onnx(module, size, args.opset)
    onnx.helper.set_model_props(proto, ensembles.onnx_metadata(description(checkpoint, size, args.labels)))
    result = {}

    def check(tmp):
        result["diff"], result["agreement"] = verify(tmp, images, reference_probs, args.labels,
                                                     args.max_prob_diff, args.min_agreement, args.output)

    with utils.atomic_open(args.output, "wb", validate=check) as f:
        f.write(proto.SerializeToString())
    diff = "" if result["diff"] is None else f"max probability difference {result['diff']:.2g}, "
    print(f"wrote {args.output} ({size}x{size}, {'labels' if args.labels else 'probabilities'}) from {path}; "
          f"onnxruntime vs PyTorch on {len(images)} images: {diff}"
          f"argmax agreement {100 * result['agreement']:.3f} %")
    return result


if __name__ == "__main__":
    utils.run_main(main, get_args_parser())
