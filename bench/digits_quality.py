"""Quality and speed of the built-in digits model, in-process (no Ray).

For each NFE and guidance scale: the share of generated images that an SVM fitted on the
real digits labels as the requested digit, and images/s of the Generator.

    python bench/digits_quality.py [--n 300] [--threads 2] [--sampler dpmpp_2m]
"""
from __future__ import annotations

import argparse
import io
import platform
import time

import numpy as np
from PIL import Image

from pipeline.config import load_config
from pipeline.request import requests_table, resolver_for
from pipeline.models import digits_train
from pipeline.worker import Generator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--nfe", type=int, nargs="+", default=[6, 10])
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.0])
    args = ap.parse_args()
    cfg = load_config(None, ["manifest.template='digit {d}'", "ray.batch_size=100", f"model.threads={args.threads}"])
    gen, clf, resolve = Generator(cfg), digits_train.reference_classifier(), resolver_for(cfg)
    print(f"# {platform.processor() or platform.machine()}, {args.threads} threads, {args.n} images per cell, "
          f"sampler {args.sampler}, 32x32 PNG")
    print("| NFE | " + " | ".join(f"guidance {g:g}" for g in args.guidance) + " |")
    print("|---|" + "---|" * len(args.guidance))
    for nfe in args.nfe:
        cells = []
        for g in args.guidance:
            rows = requests_table([resolve({"key": f"k{i}", "seed": 10_000 + i, "prompt": f"digit {i % 10}",
                                            "guidance_scale": g, "nfe": nfe, "sampler": args.sampler,
                                            "height": 32, "width": 32}, i, i)[0] for i in range(args.n)])
            t0 = time.perf_counter()
            out = gen.images(rows)
            rate = args.n / (time.perf_counter() - t0)
            ims = np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in out["image"].to_pylist()])
            acc = (clf.predict(digits_train.to_digits_features(ims)) == np.arange(args.n) % 10).mean()
            cells.append(f"{100 * acc:.1f}% ({rate:.0f} img/s)")
        print(f"| {nfe} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
