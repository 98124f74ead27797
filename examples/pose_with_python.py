"""Pose a folder of photos from Python and write a nerfstudio dataset.

    .venv/bin/python examples/pose_with_python.py examples/sacre_coeur/images outputs/sacre_coeur_api
    # without the VGGT-1B weights, try the wiring with a tiny random model:
    .venv/bin/python examples/pose_with_python.py examples/sacre_coeur/images outputs/tiny --weights random --tiny
"""  # fmt: skip
# (fmt: skip: the docstring is the --help text, shown raw, so its commands stay indented)

from __future__ import annotations

import argparse
from pathlib import Path

from ns_extreme.io.dataset import write_dataset
from ns_extreme.io.images import list_images
from ns_extreme.models import load_model
from ns_extreme.models.vggt import VGGTConfig
from ns_extreme.posing import PosingOptions, VGGTBackbone, pose_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--weights", default=None, help="Hugging Face id or local file (default facebook/VGGT-1B)")
    parser.add_argument("--tiny", action="store_true", help="use the tiny test configuration")
    args = parser.parse_args()

    model = load_model(
        "vggt",
        weights=args.weights,
        alignment="aligned" if not args.tiny else "pretrained",
        config=VGGTConfig.tiny() if args.tiny else None,
        heads=VGGTBackbone.heads,
    )  # no point head
    print(model.load_report.summary())
    backbone = VGGTBackbone(model, target_size=140 if args.tiny else 518)
    recon = pose_images(list_images(args.images), backbone, PosingOptions(conf_percentile=50, max_points=50_000))
    for pair in recon.pairs[:5]:
        print(f"views {pair.i}-{pair.j}: {pair.angle_deg:6.1f} deg apart, overlap {pair.overlap}")
    print("wrote", write_dataset(recon, args.output, overwrite=True))


if __name__ == "__main__":
    main()
