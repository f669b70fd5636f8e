"""``python -m tinymrcnn.data export-shapes OUT_DIR``: write the shapes set in COCO format.

    python -m tinymrcnn.data export-shapes data/shapes_val --num-images 200 --split val

writes OUT_DIR/images/000000.png ... and OUT_DIR/annotations.json, which
``CocoDataset(OUT_DIR/annotations.json, OUT_DIR/images)`` (or
``tinymrcnn evaluate --coco ... --images ...``) reads back unchanged.
"""

from __future__ import annotations

import argparse
import os

from .coco import export_to_coco
from .shapes import DIFFICULTIES, SPLITS, ShapesDataset


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(prog="python -m tinymrcnn.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export-shapes", help="write ShapesDataset images (PNG) + a COCO annotation JSON")
    e.add_argument("out_dir")
    e.add_argument("--num-images", type=int, default=200)
    e.add_argument("--image-size", type=int, default=128)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--split", choices=sorted(SPLITS), default="val")
    e.add_argument("--difficulty", choices=sorted(DIFFICULTIES), default="normal")
    args = parser.parse_args(argv)
    ds = ShapesDataset(
        args.num_images, image_size=args.image_size, seed=args.seed, split=args.split, difficulty=args.difficulty
    )
    path = export_to_coco(ds, args.out_dir)
    print(f"wrote {len(ds)} images to {os.path.join(args.out_dir, 'images')} and annotations to {path}")
    return path


if __name__ == "__main__":
    main()
