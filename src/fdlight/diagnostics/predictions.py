"""Pictures of a dense model's predictions on validation images: segmentation maps and detections beside their ground
truth (`predictions.png` of stage=segment and stage=detect)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fdlight.artifacts import save_figure
from fdlight.constants import IGNORE, IMAGENET_MEAN, IMAGENET_STD


def palette(num_classes: int) -> np.ndarray:
    """A fixed colour per class (tab20 first, then seeded random colours); 255 (ignored) is black."""
    import matplotlib

    colours = np.zeros((256, 3), dtype=np.uint8)
    tab = (np.asarray(matplotlib.colormaps["tab20"].colors) * 255).astype(np.uint8)
    rng = np.random.default_rng(0)
    for k in range(num_classes):
        colours[k] = tab[k] if k < len(tab) else rng.integers(40, 256, 3)
    return colours


def denormalize(x: torch.Tensor) -> np.ndarray:
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x.cpu().float() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def plot_segmentation(module, dataset, path: Path, count: int = 4) -> Path | None:
    """Image, ground truth and prediction for the first `count` validation images, one row each (`module.predict`
    of a segmentation module)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    count = min(int(count), len(dataset))
    if count <= 0:
        return None
    colours = palette(module.model.num_classes)
    fig, axes = plt.subplots(count, 3, figsize=(8.6, 2.6 * count), squeeze=False)
    module.eval()
    for row in range(count):
        image, label = dataset[row]
        pred = module.predict([image.to(module.device)], [label.shape])[0].cpu()
        scored = label != IGNORE
        acc = float((pred[scored] == label[scored]).float().mean()) if scored.any() else float("nan")
        shown = pred.clone()
        shown[~scored] = IGNORE  # unscored pixels in black, as in the ground truth
        pictures = [(denormalize(image), "image"), (colours[label.numpy()], "ground truth (black: ignored)"),
                    (colours[shown.numpy()], f"prediction, pixel acc. {acc:.2f}")]
        for ax, (picture, title) in zip(axes[row], pictures):
            ax.imshow(picture, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        shown_classes = torch.cat([label[scored], pred[scored]]).bincount().nonzero().flatten()[:8].tolist()
        axes[row][-1].legend(handles=[Patch(color=colours[k] / 255.0, label=f"class {k}") for k in shown_classes],
                             loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False)
    fig.tight_layout()
    return save_figure(fig, path)


def _overlap(a, b) -> float:
    """Area shared by two display-space bounding boxes."""
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(w, 0.0) * max(h, 0.0)


def place_labels(ax, renderer, labels: list[tuple[list[float], str, object]], fontsize: float = 7) -> None:
    """Box labels (box [x0, y0, x1, y1] in image pixels, text, colour) on an image axis. Each goes to the first of
    its box's corners (above, inside top, below, inside bottom; left then right), then of the same corners moved one,
    two, three label heights away, where it stays inside the picture and covers no label placed before; failing
    that, where it covers the least. Labels are placed in the given order (the best scores first)."""
    import matplotlib.colors
    from matplotlib.transforms import Bbox

    frame = ax.get_window_extent(renderer).frozen()
    pad = renderer.points_to_pixels(1.0)  # the coloured box around the text (bbox pad: 1 point)
    margin = 2 * pad  # and a gap to the next label
    step = 1.8 * fontsize  # points: one label height
    placed = []
    (left, right), (bottom, top) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
    for box, text, colour in labels:
        x0, x1 = (min(max(v, left), right) for v in (box[0], box[2]))  # boxes may reach past the picture
        y0, y1 = (min(max(v, bottom), top) for v in (box[1], box[3]))
        corners = [(y0, "bottom", 1), (y0, "top", -1), (y1, "top", -1), (y1, "bottom", 1)]  # image y points down
        r, g, b = matplotlib.colors.to_rgb(colour)
        ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.6 else "white"  # readable on the box's colour
        best = None
        for k in range(4):
            for x, ha in ((x0, "left"), (x1, "right")):
                for y, va, away in corners:
                    inward = 1 if ha == "left" else -1  # by the coloured box's pad: a label at an edge stays in
                    t = ax.annotate(text, (x, y), xytext=(inward, away * k * step), textcoords="offset points",
                                    fontsize=fontsize, ha=ha, va=va, color=ink, annotation_clip=False,
                                    bbox=dict(facecolor=colour, alpha=0.85, pad=1, lw=0))  # pad: points
                    t.set_clip_on(True)
                    t.set_in_layout(False)
                    e = t.get_window_extent(renderer)
                    patch = Bbox.from_extents(e.x0 - pad, e.y0 - pad, e.x1 + pad, e.y1 + pad)
                    outside = patch.width * patch.height - _overlap(patch, frame)
                    e = Bbox.from_extents(e.x0 - margin, e.y0 - margin, e.x1 + margin, e.y1 + margin)
                    cost = sum(_overlap(e, other) for other in placed) + 10 * outside
                    if best is None or cost < best[0]:
                        if best is not None:
                            best[1].remove()
                        best = (cost, t, e)
                    else:
                        t.remove()
                    if cost == 0:
                        break
                if best[0] == 0:
                    break
            if best[0] == 0:
                break
        placed.append(best[2])


def plot_detections(module, dataset, classes: list[str], path: Path, count: int = 4,
                    min_score: float = 0.5) -> Path | None:
    """Ground truth (left) beside predictions with score >= min_score (right; the best three when none reaches it),
    masks tinted, boxes outlined, each box labelled with its class (and score) where the label hides no other."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    count = min(int(count), len(dataset))
    if count <= 0:
        return None
    colours = palette(len(classes) + 1) / 255.0
    fig, axes = plt.subplots(count, 2, figsize=(8, 4.0 * count + 0.6), squeeze=False, layout="constrained")
    module.eval()
    pending = []
    for row in range(count):
        image, target = dataset[row]
        pred = module.predict([image.to(module.device)], [target])[0]
        h, w = (int(v) for v in target["size"])
        sx, sy = (float(v) for v in target["scale"])
        picture = image[:, :round(h * sy), :round(w * sx)]
        picture = torch.nn.functional.interpolate(picture[None], (h, w), mode="bilinear")[0]
        picture = picture.clamp(0, 1).permute(1, 2, 0).numpy()
        scores = pred["scores"].cpu()
        keep = scores >= min_score
        n_gt = len(target["labels"])
        shown_title = f"prediction: {int(keep.sum())} with score >= {min_score:g}"
        if not keep.any():  # a weak model: show its best three, with their scores
            keep = torch.arange(len(scores)) < 3
            shown_title = f"prediction: none scores >= {min_score:g};\nbest {int(keep.sum())} shown"
        sides = [(target["boxes"], target["labels"], target["masks"].bool(), None,
                  f"validation image {row + 1}: ground truth,\n{n_gt} object{'s' if n_gt != 1 else ''}"),
                 (pred["boxes"].cpu()[keep], pred["labels"].cpu()[keep], pred["masks"].cpu()[keep],
                  scores[keep], shown_title)]
        for ax, (boxes, labels, masks, box_scores, title) in zip(axes[row], sides):
            shown = picture.copy()
            for m, lab in zip(masks.numpy(), labels.tolist()):
                shown[m] = 0.45 * shown[m] + 0.55 * colours[lab]
            ax.imshow(shown, interpolation="nearest")
            texts = []
            for i, (box, lab) in enumerate(zip(boxes.tolist(), labels.tolist())):
                x0, y0, x1, y1 = box
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.5, ec=colours[lab]))
                text = classes[lab - 1] + (f" {float(box_scores[i]):.2f}" if box_scores is not None else "")
                texts.append((box, text, colours[lab]))
            ax.set_title(title, fontsize=9)
            ax.axis("off")
            pending.append((ax, texts))
    fig.suptitle("Detections on validation images: boxes and tinted masks, labelled with class (and score)",
                 fontsize=10)
    fig.canvas.draw()  # lays the figure out and fits each axis to its image: label positions on the page are final
    renderer = fig.canvas.get_renderer()
    for ax, texts in pending:
        place_labels(ax, renderer, texts)
    return save_figure(fig, path)
