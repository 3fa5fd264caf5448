"""
Time `data.load` on a folder of 32x32 RGB PNGs: the first run decodes, the second reads the cache.

    python tools/bench_folder.py [N] [FOLDER]    # defaults: 50000 images, a temporary folder

The images are written first (random pixels in 10 class subfolders, the hardest case for PNG), and
the folder and the cache are removed at the end unless FOLDER is given.
"""

import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cli  # noqa: E402
import data  # noqa: E402


def write_folder(folder, n):
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = os.path.join(folder, f"class{i % 10}")
        os.makedirs(sub, exist_ok=True)
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(os.path.join(sub, f"{i:06d}.png"))


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
    with tempfile.TemporaryDirectory() as tmp:
        folder = sys.argv[2] if len(sys.argv) > 2 else os.path.join(tmp, "images")
        if not os.path.isdir(folder):
            start = time.time()
            write_folder(folder, n)
            print(f"wrote {n} PNGs in {time.time() - start:.1f} s")
        for run in ("first (decodes)", "second (the cache)"):
            start = time.time()
            dataset = data.load(folder, os.path.join(tmp, "root"), note=lambda text: None)
            shape = tuple(dataset.images.shape)
            print(f"{run}: {time.time() - start:.1f} s, {shape} training images")
        print(cli.machine())


if __name__ == "__main__":
    main()
