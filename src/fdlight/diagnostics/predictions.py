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


def plot_detections(module, dataset, classes: list[str], path: Path, count: int = 4,
                    min_score: float = 0.5) -> Path | None:
    """Ground truth (left) beside predictions with score >= min_score (right), masks tinted, boxes labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    count = min(int(count), len(dataset))
    if count <= 0:
        return None
    colours = palette(len(classes) + 1) / 255.0
    fig, axes = plt.subplots(count, 2, figsize=(7, 3.4 * count), squeeze=False)
    module.eval()
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
        shown_title = f"prediction (score >= {min_score})"
        if not keep.any():  # a weak model: show its best three, with their scores
            keep = torch.arange(len(scores)) < 3
            shown_title = f"top predictions (all scores < {min_score})"
        sides = [(target["boxes"], target["labels"], target["masks"].bool(), None, "ground truth"),
                 (pred["boxes"].cpu()[keep], pred["labels"].cpu()[keep], pred["masks"].cpu()[keep],
                  scores[keep], shown_title)]
        for ax, (boxes, labels, masks, scores, title) in zip(axes[row], sides):
            shown = picture.copy()
            for m, lab in zip(masks.numpy(), labels.tolist()):
                shown[m] = 0.45 * shown[m] + 0.55 * colours[lab]
            ax.imshow(shown, interpolation="nearest")
            for i, (box, lab) in enumerate(zip(boxes.tolist(), labels.tolist())):
                x0, y0, x1, y1 = box
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.5, ec=colours[lab]))
                text = classes[lab - 1] + (f" {float(scores[i]):.2f}" if scores is not None else "")
                ax.text(x0, y0, text, fontsize=7, va="bottom", color="white",
                        bbox=dict(facecolor=colours[lab], alpha=0.8, pad=1, lw=0))
            ax.set_title(f"{title}: {len(labels)}", fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path)
