#!/usr/bin/env python
"""Sort the flat official ImageNet-1k validation set into per-synset folders (torchvision ImageFolder layout).

From the devkit (ILSVRC2012_devkit_t12.tar.gz, unpacked)::

    python tools/sort_imagenet_val.py --val-dir imagenet/val \
        --labels ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt \
        --meta ILSVRC2012_devkit_t12/data/meta.mat

or from Kaggle's ``LOC_val_solution.csv`` (no ``--meta`` needed). Images are moved in place by default
(``--out`` and ``--mode copy|symlink`` to leave the originals). See ``mmoe.data.imagenet.sort_val_images``.
"""

from __future__ import annotations

import argparse
import json

from mmoe.data.imagenet import read_val_labels, sort_val_images


def main(argv: list[str] | None = None) -> dict[str, int]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--val-dir", required=True, help="folder with ILSVRC2012_val_*.JPEG")
    p.add_argument("--labels", required=True, help="ILSVRC2012_validation_ground_truth.txt or LOC_val_solution.csv")
    p.add_argument("--meta", default=None, help="devkit data/meta.mat (or a text list of WordNet ids in ID order)")
    p.add_argument("--out", default=None, help="output root (default: sort inside --val-dir)")
    p.add_argument("--mode", choices=("move", "copy", "symlink"), default="move")
    args = p.parse_args(argv)
    labels = read_val_labels(args.labels, args.meta)
    counts = sort_val_images(args.val_dir, labels, out_dir=args.out, mode=args.mode)
    print(json.dumps(counts))
    return counts


if __name__ == "__main__":
    main()
