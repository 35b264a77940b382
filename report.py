"""Charts and offline HTML reports: the dataset report, the evaluation report and the run comparison.

    python dataset_tool.py summary --root data/demo --json train_all.json --report reports/demo-data
    python inference.py --checkpoints runs/demo --json val.json --eval --report reports/demo-val
    python compare_runs.py runs/a runs/b --report reports/a-vs-b

Each report is a folder: PNG charts drawn by matplotlib's Agg renderer (no display
needed) in the toolkit's class colours, a report.json with every number the
charts show, and an index.html that shows both and opens offline (it links only
files in its own folder). Every file is written atomically.
"""
import collections
import heapq
import html
import math
import os
import textwrap

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, NullFormatter

import coco_utils
import dataset as data
import images as imaging
import utils

DPI = 100  # a figure of w x h inches is a PNG of (w * DPI) x (h * DPI) pixels
PANEL_INCHES = 3
ERROR_RGB = (255, 0, 0)


# ---------------------------------------------------------------- the report folder
class Report:
    """A folder of charts and tables under headings; write() adds report.json and index.html."""

    def __init__(self, folder, title, subtitle=""):
        self.folder, self.title, self.subtitle = os.fspath(folder), title, subtitle
        self.sections = []
        self.figures = []  # {"file", "width", "height", "title"} of every PNG, in the order shown

    def section(self, heading, text=""):
        self.sections.append({"heading": heading, "text": text, "items": []})

    def add_figure(self, name, fig, caption):
        """Render `fig` into NAME.png (its size in pixels is its size in inches times DPI)."""
        file_name = name + ".png"
        save_figure(fig, os.path.join(self.folder, file_name))
        width, height = (round(inches * DPI) for inches in fig.get_size_inches())
        title = fig.get_suptitle() or " / ".join(ax.get_title() for ax in fig.axes if ax.get_title())
        entry = {"file": file_name, "width": width, "height": height, "title": title}
        self.figures.append(entry)
        self.sections[-1]["items"].append(("figure", dict(entry, caption=caption)))
        return file_name

    def add_table(self, headers, rows):
        self.sections[-1]["items"].append(("table", (headers, rows)))

    def write(self, numbers):
        """Write report.json (`numbers` plus the figure list) and index.html; returns index.html's path."""
        utils.atomic_write_json(os.path.join(self.folder, "report.json"), dict(numbers, figures=self.figures))
        path = os.path.join(self.folder, "index.html")
        with utils.atomic_open(path, "w") as f:
            f.write(self._html())
        return path

    def _html(self):
        e = html.escape
        parts = ["<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">",
                 f"<title>{e(self.title)}</title>",
                 f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>{e(self.title)}</h1>"]
        if self.subtitle:
            parts.append(f"<p>{e(self.subtitle)}</p>")
        for section in self.sections:
            parts.append(f"<section>\n<h2>{e(section['heading'])}</h2>")
            if section["text"]:
                parts.append(f"<p>{e(section['text'])}</p>")
            for kind, item in section["items"]:
                parts.append(_figure_html(item) if kind == "figure" else _table_html(*item))
            parts.append("</section>")
        parts.append('<p>Every number in these charts: <a href="report.json">report.json</a>.</p>\n</body>\n</html>\n')
        return "\n".join(parts)


STYLE = ("body{font-family:sans-serif;max-width:1250px;margin:2em auto;padding:0 1em;color:#222}"
         "img{max-width:100%;height:auto;border:1px solid #ddd}figure{margin:1em 0}"
         "figcaption{color:#555;font-size:90%}table{border-collapse:collapse;margin:1em 0}"
         "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}th{background:#f4f4f4}")


def _figure_html(item):
    e = html.escape
    return (f"<figure><img src=\"{e(item['file'])}\" width=\"{item['width']}\" height=\"{item['height']}\" "
            f"alt=\"{e(item['title'])}\"><figcaption>{e(item['caption'])}</figcaption></figure>")


def _table_html(headers, rows):
    e = html.escape
    head = "".join(f"<th>{e(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


# ---------------------------------------------------------------- chart helpers
def class_colours(num_classes):
    """The toolkit's class palette as matplotlib colours."""
    return utils.class_palette(num_classes) / 255.0


def class_legend(fig, class_names, labels):
    handles = [Patch(facecolor=class_colours(len(class_names))[label], edgecolor="0.4", label=class_names[label])
               for label in labels]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), fontsize=8)


def short_count(n):
    """12, 3.4k, 1.2M: counts short enough for a heatmap cell."""
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(int(n))


def plain(value):
    """A number for JSON: NaN (a class absent from ground truth and prediction) becomes null."""
    return None if value is None or math.isnan(value) else float(value)


def as_number(value):
    """The inverse of plain(): null becomes NaN."""
    return float("nan") if value is None else value


def class_bars(ax, class_names, labels, values, title, xlabel, log=False):
    """Horizontal bars, one per class in its own colour, the value written at each bar's end."""
    colours = class_colours(len(class_names))
    shown = [0 if math.isnan(v) else v for v in values]
    ax.barh(range(len(labels)), shown, color=colours[labels], edgecolor="0.4")
    ax.set_yticks(range(len(labels)), labels=[class_names[label] for label in labels])
    ax.invert_yaxis()
    if log:
        log_x_axis(ax)
        positive = [v for v in shown if v > 0] or [1]
        # bars start at a power of ten under half the smallest value, so every bar shows; room for the texts
        ax.set_xlim(10 ** math.floor(math.log10(min(positive) / 2)), 4 * max(positive))
    for y, v in enumerate(values):
        text = "absent" if math.isnan(v) else (short_count(v) if log else f"{v:.3f}")
        ax.text(v if v > 0 else (1 if log else 0), y, " " + text, va="center", fontsize=8)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("class")


def log_x_axis(ax):
    """A log-scale x axis labelled with plain numbers (0.1, 1, 10, 1.0k, 1.0M), no labels on minor ticks."""
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}" if value < 1000 else short_count(value)))
    ax.xaxis.set_minor_formatter(NullFormatter())


def heatmap(fig, ax, values, texts, row_names, col_names, title, xlabel, ylabel, colour_label, vmax=None):
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=vmax, aspect="auto")
    fig.colorbar(image, ax=ax, label=colour_label, shrink=0.8)
    ax.set_xticks(range(len(col_names)), labels=col_names, rotation=45, ha="right")
    ax.set_yticks(range(len(row_names)), labels=row_names)
    limit = np.nanmax(values) if vmax is None else vmax
    for (i, j), text in np.ndenumerate(texts):
        dark = limit and values[i, j] > 0.6 * limit
        ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def save_figure(fig, path):
    """Render `fig` into the PNG `path`: its size in pixels is its size in inches times DPI."""
    FigureCanvasAgg(fig)
    with utils.atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=DPI)


def new_figure(width, height):
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def show_image(ax, rgb, title):
    ax.imshow(rgb)
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()


# ---------------------------------------------------------------- dataset report
def dataset_statistics(dataset, n_folds=None, fold_seed=0):
    """Counts behind the dataset report, as plain data (class labels index `class_names`)."""
    coco, num_classes = dataset.coco, dataset.coco.num_classes
    cooccurrence = np.zeros((num_classes, num_classes), dtype=np.int64)
    area_shares = collections.defaultdict(list)
    objects, sizes, labels_per_image = [], collections.Counter(), {}
    for image, labels in zip(dataset.images, data.image_labels(dataset)):
        present = sorted(labels)
        cooccurrence[np.ix_(present, present)] += 1
        areas = coco_utils.object_areas(coco, image)
        for label, percent in areas:
            area_shares[label].append(percent)
        objects.append(len(areas))
        sizes[(image["width"], image["height"])] += 1
        labels_per_image[image["id"]] = present
    stats = {
        "json": os.path.basename(coco.path), "images": len(dataset.images), "class_names": dataset.class_names,
        "annotations_per_class": coco_utils.label_counts(coco, dataset.images).tolist(),
        "pixels_per_class": data.pixel_counts(dataset).tolist(),
        "objects_per_image": dict(sorted(collections.Counter(objects).items())),
        "image_sizes": [{"width": w, "height": h, "images": n} for (w, h), n in sorted(sizes.items())],
        "cooccurrence": cooccurrence.tolist(),
        "object_area_percent": {dataset.class_names[label]: _quantiles(shares)
                                for label, shares in sorted(area_shares.items())},
        "labels_per_image": labels_per_image,
    }
    if n_folds is not None:
        by_id = {image["id"]: image for image in coco.images}
        folds = [[by_id[i] for i in fold_ids] for fold_ids in data.kfold_splits(coco, n_folds, fold_seed)]
        stats["folds"] = [{"images": len(fold), "annotations_per_class": coco_utils.label_counts(coco, fold).tolist()}
                          for fold in folds]
    return stats, area_shares


def _quantiles(values):
    low, q1, median, q3, high = np.percentile(values, [0, 25, 50, 75, 100]).tolist()
    return {"count": len(values), "min": low, "q1": q1, "median": median, "q3": q3, "max": high}


def sample_image_indices(dataset, labels_per_image, annotations_per_class, count=12, seed=0):
    """Dataset indices to show: one image for each class, rarest class first, then seeded random ones."""
    chosen, covered = [], set()
    for label in sorted(range(1, len(annotations_per_class)), key=data.by_rarity(annotations_per_class)):
        if annotations_per_class[label] == 0 or label in covered:
            continue
        index = next(i for i, image in enumerate(dataset.images) if label in labels_per_image[image["id"]])
        chosen.append(index)
        covered.update(labels_per_image[dataset.images[index]["id"]])
    rest = [i for i in np.random.default_rng(seed).permutation(len(dataset.images)).tolist() if i not in chosen]
    return chosen + rest[:max(0, count - len(chosen))]


def write_dataset_report(dataset, folder, fold=None, n_folds=5, fold_seed=0, samples=12):
    """Charts of a labelled dataset; `fold` adds the per-fold class balance of that k-fold split."""
    stats, area_shares = dataset_statistics(dataset, n_folds if fold is not None else None, fold_seed)
    names = stats["class_names"]
    report = Report(folder, f"Dataset report: {stats['json']}",
                    f"{stats['images']} images in {dataset.coco.root}, {sum(stats['annotations_per_class'])} "
                    f"annotations, {len(names) - 1} classes.")
    report.section("Classes", "Annotations count objects; pixels count mask labels after painting "
                   "(overlaps hide pixels of the objects underneath). Log scales: rare classes stay visible.")
    report.add_figure("class_counts", class_counts_figure(stats),
                      "Annotations (left) and mask pixels (right) per class.")
    pixels_total = max(sum(stats["pixels_per_class"]), 1)
    report.add_table(["class", "annotations", "pixels", "pixel share", "images with it"],
                     [[names[c], stats["annotations_per_class"][c] if c else "-", stats["pixels_per_class"][c],
                       f"{stats['pixels_per_class'][c] / pixels_total:.4f}", stats["cooccurrence"][c][c] if c else "-"]
                      for c in range(len(names))])
    report.section("Images")
    report.add_figure("images", images_figure(stats), "How many objects each image holds, and the image sizes.")
    report.add_figure("classes_in_images", classes_in_images_figure(stats, area_shares),
                      "Left: images in which two classes appear together (diagonal: images holding the class). "
                      "Right: object areas per class (box: quartiles; whiskers: 1.5 IQR).")

    if "folds" in stats:
        report.section(f"Folds ({n_folds}-fold split, seed {fold_seed})",
                       "The split train.py --fold uses: images stratified by their rarest class. Even colours in a "
                       "column mean the class is spread evenly over the folds.")
        report.add_figure("folds", fold_balance_figure(stats["folds"], names, fold),
                          "Colour: share of each class's annotations in the fold; number: its annotations. "
                          f"Fold {fold} is the val fold of --fold {fold}; the others are its training images.")

    indices = sample_image_indices(dataset, stats["labels_per_image"], stats["annotations_per_class"], samples)
    report.section("Samples", "Images with their masks overlaid: one for every class (rarest first), "
                   "then random ones.")
    report.add_figure("samples", sample_grid(dataset, indices), "Each title: file name and the classes in the image.")
    stats["samples"] = [dataset.images[i]["file_name"] for i in indices]
    stats["labels_per_image"] = {str(k): v for k, v in stats["labels_per_image"].items()}
    return report.write(stats)


def class_counts_figure(stats):
    names = stats["class_names"]
    fig = new_figure(12, 0.35 * len(names) + 1.5)
    axes = fig.subplots(1, 2)
    class_bars(axes[0], names, list(range(1, len(names))), stats["annotations_per_class"][1:],
               "Annotations per class", "annotations (log scale)", log=True)
    class_bars(axes[1], names, list(range(len(names))), stats["pixels_per_class"], "Pixels per class",
               "pixels (log scale)", log=True)
    return fig


def images_figure(stats):
    fig = new_figure(12, 4)
    axes = fig.subplots(1, 2)
    counts = stats["objects_per_image"]
    axes[0].bar(list(counts), list(counts.values()), color="0.5")
    axes[0].set(title="Objects per image", xlabel="annotations in the image", ylabel="images")
    axes[0].xaxis.get_major_locator().set_params(integer=True)
    widths, heights, n = (np.array([s[k] for s in stats["image_sizes"]]) for k in ("width", "height", "images"))
    axes[1].scatter(widths, heights, s=30 + 300 * n / n.max(), color="0.5", alpha=0.7)
    for w, h, k in zip(widths, heights, n):
        axes[1].annotate(str(k), (w, h), ha="center", va="center", fontsize=8)
    axes[1].set(title="Image sizes (number: images of that size)", xlabel="width (pixels)", ylabel="height (pixels)")
    return fig


def classes_in_images_figure(stats, area_shares):
    names = stats["class_names"]
    fig = new_figure(12, 0.3 * len(names) + 5)
    axes = fig.subplots(1, 2)
    cooccurrence = np.array(stats["cooccurrence"])[1:, 1:]
    heatmap(fig, axes[0], cooccurrence, np.vectorize(str)(cooccurrence), names[1:], names[1:],
            "Class co-occurrence", "class", "class", "images holding both classes")
    present = [c for c in range(1, len(names)) if area_shares[c]]
    box = axes[1].boxplot([area_shares[c] for c in present], orientation="horizontal",
                          tick_labels=[names[c] for c in present], patch_artist=True)
    for patch, c in zip(box["boxes"], present):
        patch.set_facecolor(class_colours(len(names))[c])
    axes[1].invert_yaxis()
    log_x_axis(axes[1])
    axes[1].set(title="Object size per class", xlabel="object area, % of its image (log scale)", ylabel="class")
    return fig


def fold_balance_figure(folds, names, val_fold):
    counts = np.array([f["annotations_per_class"][1:] for f in folds])
    shares = counts / np.maximum(counts.sum(0, keepdims=True), 1)
    rows = [f"fold {k}{' (val)' if k == val_fold else ''}: {f['images']} images" for k, f in enumerate(folds)]
    fig = new_figure(min(12, 0.8 * len(names) + 5), 0.5 * len(folds) + 3)
    heatmap(fig, fig.subplots(), shares, np.vectorize(str)(counts), rows, names[1:], "Per-fold class balance",
            "class", "fold", "share of the class's annotations", vmax=1)
    return fig


def sample_grid(dataset, indices, columns=4):
    columns = min(columns, len(indices))
    rows = math.ceil(len(indices) / columns)
    fig = new_figure(PANEL_INCHES * columns, PANEL_INCHES * rows + 0.8)
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    num_classes, shown = dataset.coco.num_classes, set()
    for ax, index in zip(axes, indices):
        info = dataset.images[index]
        mask = dataset.label_mask(index)
        rgb = imaging.read_image(dataset.coco.image_path(info), (info["height"], info["width"]))
        labels = [int(c) for c in np.unique(mask) if 0 < c < num_classes]
        shown.update(labels)
        show_image(ax, utils.overlay(rgb, mask, num_classes),
                   os.path.basename(info["file_name"]) + "\n" +
                   textwrap.fill(", ".join(dataset.class_names[c] for c in labels), 45))
    for ax in axes[len(indices):]:
        ax.set_axis_off()
    fig.suptitle("Sample images with their masks")
    class_legend(fig, dataset.class_names, sorted(shown) or [0])
    return fig


# ---------------------------------------------------------------- contact sheet
SHEET_INCHES = 2  # a contact sheet's photo and its caption
SHEET_TITLE_INCHES = 0.5


def contact_sheet(thumbnails, captions, title, columns=6):
    """RGB photos in a grid, each under its caption: SHEET_INCHES squares, `columns` a row, and a title band."""
    columns = min(columns, len(thumbnails))
    rows = math.ceil(len(thumbnails) / columns)
    fig = new_figure(SHEET_INCHES * columns, SHEET_INCHES * rows + SHEET_TITLE_INCHES)
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax, rgb, caption in zip(axes, thumbnails, captions):
        show_image(ax, rgb, caption)
    for ax in axes[len(thumbnails):]:
        ax.set_axis_off()
    fig.suptitle(title)
    return fig


# ---------------------------------------------------------------- evaluation report
class EvalReport:
    """Fed (image info, ground truth, prediction) per image; write() draws the evaluation report.

    The dataset confusion matrix is the sum of the per-image ones, so its scores are
    exactly utils.ConfusionMatrix's over the same predictions. Only the `worst` lowest
    per-image mIoU images keep their masks.
    """

    def __init__(self, class_names, worst=12):
        self.class_names, self.worst_count = list(class_names), worst
        self.confusion = utils.ConfusionMatrix(len(class_names))
        self.per_image = []  # (file_name, mIoU)
        self._worst = []  # heap: the highest mIoU (latest on ties) is popped first

    def add(self, info, target, prediction, image_path):
        image_confusion = utils.ConfusionMatrix(len(self.class_names))
        image_confusion.update(torch.as_tensor(np.asarray(target)), torch.as_tensor(np.asarray(prediction)))
        self.confusion.mat += image_confusion.mat
        miou = image_confusion.compute()["miou"]
        order = len(self.per_image)
        self.per_image.append((info["file_name"], miou))
        if math.isnan(miou) or self.worst_count == 0:  # every pixel ignored: nothing to rank
            return
        heapq.heappush(self._worst, (-miou, -order, info["file_name"], image_path,
                                     np.array(target, dtype=np.uint8), np.array(prediction, dtype=np.uint8)))
        if len(self._worst) > self.worst_count:
            heapq.heappop(self._worst)

    def worst(self):
        """[(file_name, mIoU, image path, ground truth, prediction)], lowest mIoU first (ties: dataset order)."""
        return [(name, -neg, path, target, pred)
                for neg, _, name, path, target, pred in sorted(self._worst, key=lambda w: (-w[0], -w[1]))]

    def numbers(self):
        mat = self.confusion.mat.numpy()
        scores = utils.scores_from_confusion(mat)
        with np.errstate(divide="ignore", invalid="ignore"):
            normalised = mat / mat.sum(1, keepdims=True)
        mious = np.array([m for _, m in self.per_image], dtype=np.float64)
        histogram, edges = np.histogram(mious[~np.isnan(mious)], bins=20, range=(0, 1))
        return {
            "class_names": self.class_names, "images": len(self.per_image),
            "miou": plain(scores["miou"]), "pixel_acc": plain(scores["acc"]), "class_acc": plain(scores["acc_cls"]),
            "fwiou": plain(scores["fwiou"]), "iou": [plain(v) for v in scores["iou"]],
            "confusion": mat.tolist(), "confusion_row_normalised": [[plain(v) for v in row] for row in normalised],
            "most_confused": most_confused(mat, self.class_names),
            "per_image": [{"file_name": name, "miou": plain(m)} for name, m in self.per_image],
            "per_image_miou_histogram": {"edges": edges.tolist(), "images": histogram.tolist()},
        }

    def write(self, folder, title):
        numbers = self.numbers()
        names = self.class_names
        report = Report(folder, title, f"{numbers['images']} images; mIoU {numbers['miou']:.4f}, pixel accuracy "
                        f"{numbers['pixel_acc']:.4f}, class accuracy {numbers['class_acc']:.4f}, "
                        f"frequency-weighted IoU {numbers['fwiou']:.4f}.")
        report.section("Confusion", "Rows: ground-truth class; columns: predicted class. Colour and first line: "
                       "share of the row's pixels; second line: pixels.")
        report.add_figure("confusion", confusion_figure(np.array(numbers["confusion"]), names),
                          "Row-normalised confusion matrix over all pixels (ignored pixels left out).")
        report.add_table(["ground truth", "predicted as", "pixels", "share of the class's pixels"],
                         [[p["true"], p["predicted"], p["pixels"], f"{p['share']:.4f}"]
                          for p in numbers["most_confused"]])
        report.section("Scores")
        report.add_figure("scores", scores_figure(numbers), "Left: IoU of each class over the dataset (absent: "
                          "in neither ground truth nor prediction). Right: distribution of the mIoU of single images.")
        worst = self.worst()
        report.section(f"The {len(worst)} worst images", "Image | ground truth | prediction | errors (red: wrong "
                       "pixels; white in the masks: ignored), lowest per-image mIoU first.")
        numbers["worst"] = []
        for rank, (name, miou, path, target, pred) in enumerate(worst, start=1):
            file_name = report.add_figure(f"worst_{rank:02d}", worst_panel(path, target, pred, names, name, miou),
                                          f"{rank}. {name}: mIoU {miou:.4f}")
            numbers["worst"].append({"rank": rank, "file_name": name, "miou": miou, "figure": file_name})
        return report.write(numbers)


def most_confused(mat, class_names, count=10):
    """The largest off-diagonal cells: which class is taken for which, in pixels and share of its row."""
    off = mat.astype(np.float64).copy()
    np.fill_diagonal(off, 0)
    rows = mat.sum(1)
    pairs = [(i, j) for i, j in zip(*np.unravel_index(np.argsort(-off, axis=None), off.shape)) if off[i, j] > 0]
    return [{"true": class_names[i], "predicted": class_names[j], "pixels": int(mat[i, j]),
             "share": float(mat[i, j] / rows[i])} for i, j in pairs[:count]]


def scores_figure(numbers):
    names = numbers["class_names"]
    fig = new_figure(12, 0.35 * len(names) + 1.5)
    axes = fig.subplots(1, 2)
    iou = [as_number(v) for v in numbers["iou"]]
    class_bars(axes[0], names, list(range(len(names))), iou, f"IoU per class (mIoU {numbers['miou']:.4f})", "IoU")
    axes[0].axvline(numbers["miou"], color="0.3", linestyle="--", label="mIoU")
    axes[0].set_xlim(0, 1.15)
    axes[0].legend(loc="lower right")
    histogram = numbers["per_image_miou_histogram"]
    axes[1].stairs(histogram["images"], histogram["edges"], fill=True, color="0.6")
    axes[1].set(title="Per-image mIoU", xlabel="mIoU of one image", ylabel="images", xlim=(0, 1))
    return fig


def confusion_figure(mat, names):
    with np.errstate(divide="ignore", invalid="ignore"):
        normalised = mat / mat.sum(1, keepdims=True)
    texts = np.array([[("-" if np.isnan(v) else f"{v:.2f}") + f"\n{short_count(c)}" for v, c in zip(vr, cr)]
                      for vr, cr in zip(normalised, mat)])
    side = 0.7 * len(names) + 3
    fig = new_figure(side + 1, side)
    heatmap(fig, fig.subplots(), normalised, texts, names, names,
            "Confusion matrix (row-normalised, with pixel counts)",
            "predicted class", "ground-truth class", "share of the ground-truth class's pixels", vmax=1)
    return fig


def wrong_pixels(target, pred):
    """Pixels predicted wrong; ignored pixels never count as wrong."""
    return (pred != target) & (target != utils.IGNORE_INDEX)


def error_image(rgb, wrong):
    """The image dimmed to grey, wrong pixels red."""
    grey = (rgb.astype(np.float32).mean(2, keepdims=True) * 0.4).astype(np.uint8).repeat(3, axis=2)
    grey[wrong] = ERROR_RGB
    return grey


def worst_panel(image_path, target, pred, class_names, file_name, miou):
    rgb = imaging.read_image(image_path, target.shape)
    n = len(class_names)
    fig = new_figure(4 * PANEL_INCHES, PANEL_INCHES + 1)
    axes = fig.subplots(1, 4)
    wrong = wrong_pixels(target, pred)
    for ax, panel, title in zip(axes, (rgb, utils.colorize(target, n), utils.colorize(pred, n),
                                       error_image(rgb, wrong)),
                                ("image", "ground truth", "prediction", f"errors: {wrong.mean():.1%} of pixels")):
        show_image(ax, panel, title)
    fig.suptitle(f"{file_name}: mIoU {miou:.4f}")
    labels = sorted({int(c) for c in np.unique(np.concatenate([target.ravel(), pred.ravel()])) if c < n})
    class_legend(fig, class_names, labels)
    return fig


# ---------------------------------------------------------------- run comparison
def write_run_comparison(folder, histories, chosen):
    """`histories`: {run name: metrics.json records}; `chosen`: {run name: the record compared per class}."""
    runs = list(histories)
    names = list(next(iter(chosen.values()))["iou"])
    report = Report(folder, "Run comparison", ", ".join(runs))
    report.section("Validation mIoU over epochs")
    fig = new_figure(10, 5)
    ax = fig.subplots()
    for run in runs:
        ax.plot([r["epoch"] for r in histories[run]], [as_number(r["miou"]) for r in histories[run]],
                marker="o", label=run)
    ax.set(title="Validation mIoU over epochs", xlabel="epoch", ylabel="mIoU")
    ax.legend()
    ax.grid(alpha=0.3)
    report.add_figure("miou_over_epochs", fig, "Each run's validations, from its metrics.json.")
    report.section("Per-class IoU")
    fig = new_figure(12, 0.3 * len(names) * max(1, len(runs) / 2) + 2)
    ax = fig.subplots()
    height = 0.8 / len(runs)
    for k, run in enumerate(runs):
        values = [as_number(chosen[run]["iou"][n]) for n in names]
        ax.barh(np.arange(len(names)) + (k - (len(runs) - 1) / 2) * height, np.nan_to_num(values), height=height,
                label=f"{run} (epoch {chosen[run]['epoch']}, mIoU {as_number(chosen[run]['miou']):.4f})")
    ax.set_yticks(range(len(names)), labels=names)
    for tick, colour in zip(ax.get_yticklabels(), class_colours(len(names))):
        tick.set_bbox({"facecolor": colour, "alpha": 0.35, "edgecolor": "none"})
    ax.invert_yaxis()
    ax.set(title="Per-class IoU side by side", xlabel="IoU", ylabel="class", xlim=(0, 1))
    ax.legend(loc="lower right", fontsize=8)
    report.add_figure("per_class_iou", fig, "The compared validation of each run (named in the legend); "
                      "a class absent from a validation has no bar.")
    report.add_table(["class"] + runs, [[n] + ["-" if chosen[r]["iou"][n] is None else f"{chosen[r]['iou'][n]:.4f}"
                                         for r in runs] for n in names])
    return report.write({"runs": {run: {"miou_over_epochs": [[r["epoch"], r["miou"]] for r in histories[run]],
                                        "compared": chosen[run]} for run in runs}})
