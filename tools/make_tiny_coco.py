#!/usr/bin/env python
"""Write a tiny COCO-format detection set of generated images (squares and triangles, polygon masks).

    python tools/make_tiny_coco.py runs/det-demo/coco       # train/ and test/ with annotations.json each

Then: python tools/det_train.py --train-json runs/det-demo/coco/train/annotations.json \\
          --train-images runs/det-demo/coco/train/images --test-json ... --test-images ...
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from det.demo_data import make_tiny_coco


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder to write train/ and test/ into")
    p.add_argument("--train-images", type=int, default=16)
    p.add_argument("--test-images", type=int, default=8)
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    args = p.parse_args(argv)
    for split, n, seed in (("train", args.train_images, 0), ("test", args.test_images, 1)):
        ann, images = make_tiny_coco(Path(args.out) / split, n_images=n, size=args.size, seed=seed)
        print(f"{split}: {n} images in {images}, annotations {ann}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
