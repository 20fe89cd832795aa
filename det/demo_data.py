"""A tiny COCO-format detection set, generated: squares and triangles with real polygon masks.

For the detection on-ramp (``make det-demo``) and the tests: detectron2 trains and evaluates on it
exactly as on COCO (``--train-json`` / ``--train-images``), with no download.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

__all__ = ["CATEGORIES", "make_tiny_coco"]

CATEGORIES = [{"id": 1, "name": "square"}, {"id": 2, "name": "triangle"}]
COLORS = {1: (220, 40, 40), 2: (40, 200, 60)}


def make_tiny_coco(root: Path, n_images: int = 4, size: int = 128, seed: int = 0) -> tuple[Path, Path]:
    """Write ``n_images`` PNGs with filled squares/triangles and their COCO polygon annotations.

    Returns (annotation json, image folder). Shapes are solid colours on a grey background so a
    detector can in principle learn them, and every annotation is a real polygon mask.
    """
    rng = random.Random(seed)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, n_images + 1):
        img = Image.new("RGB", (size, size), (128, 128, 128))
        draw = ImageDraw.Draw(img)
        for _ in range(2):
            cat = rng.choice([1, 2])
            w = rng.randint(size // 4, size // 2)
            x0, y0 = rng.randint(0, size - w - 1), rng.randint(0, size - w - 1)
            if cat == 1:
                pts = [(x0, y0), (x0 + w, y0), (x0 + w, y0 + w), (x0, y0 + w)]
            else:
                pts = [(x0, y0 + w), (x0 + w // 2, y0), (x0 + w, y0 + w)]
            draw.polygon(pts, fill=COLORS[cat])
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            area = float(w * w if cat == 1 else w * w / 2)
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": cat,
                "segmentation": [[float(c) for p in pts for c in p]],
                "bbox": [float(min(xs)), float(min(ys)), float(max(xs) - min(xs)), float(max(ys) - min(ys))],
                "area": area,
                "iscrowd": 0,
            })
        name = f"{image_id:04d}.png"
        img.save(images_dir / name)
        images.append({"id": image_id, "file_name": name, "width": size, "height": size})
    ann = root / "annotations.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return ann, images_dir
