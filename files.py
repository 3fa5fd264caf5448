"""
Files out, written atomically so that a crash never leaves half a file: checkpoints, PNG grids,
.npz arrays, GIFs, tables and line plots.
"""

import contextlib
import math
import os
import re
import tempfile
import time

import torch

import cli
import data
import sgm

TMP_PREFIX = ".sgm-tmp-"  # atomic_write's temporary files: .sgm-tmp-<pid>-<random>.tmp
STALE_SECONDS = 60


def atomic_write(path, write):
    """write(tmp_path), then rename over `path`: a file is replaced only by a complete one, and a
    crash never leaves half a file. For checkpoints, images, arrays and tables alike. On failure
    the temporary file goes, and so do the folders this call created; an OS error names `path`.
    Temporary files that a killed write left in the folder are removed first (`remove_stale`)."""
    folder = os.path.dirname(os.path.abspath(path))
    created, missing = [], folder  # the folders to create, deepest first
    while not os.path.exists(missing):
        created.append(missing)
        missing = os.path.dirname(missing)
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        remove_stale(folder)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{TMP_PREFIX}{os.getpid()}-", suffix=".tmp")
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException as e:
        for leftover, remove in [(tmp, os.remove), *((made, os.rmdir) for made in created)]:
            if leftover is not None:
                with contextlib.suppress(OSError):
                    remove(leftover)
        if isinstance(e, OSError) and e.errno:  # an error about the temporary file names `path`
            if e.filename in (None, tmp, *created) or TMP_PREFIX in str(e.filename):
                raise OSError(e.errno, e.strerror, path) from None
        raise


def remove_stale(folder):
    """Remove atomic_write's temporary files in `folder` that a killed write left: those of a
    process no longer running on this machine, untouched for STALE_SECONDS (a live write from
    another machine keeps its file fresh). Nothing else is ever removed."""
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            match = re.fullmatch(re.escape(TMP_PREFIX) + r"(\d+)-\w+\.tmp", name)
            path = os.path.join(folder, name)
            if match and not running(int(match[1])):
                with contextlib.suppress(OSError):
                    if time.time() - os.path.getmtime(path) > STALE_SECONDS:
                        os.remove(path)


def running(pid):
    """Whether process `pid` runs on this machine (when unsure: yes)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process, or no such number
        return True
    return True


def save_torch(obj, path):
    """torch.save through atomic_write. torch's writer reports a full disk as a RuntimeError
    ("unexpected pos ..."), not an OSError: it becomes one line too."""
    try:
        atomic_write(path, lambda tmp: torch.save(obj, tmp))
    except RuntimeError as e:
        raise sgm.SGMError(
            f"{path}: cannot be written ({cli.first_line(e)}); is the disk full? An earlier file "
            "there is untouched"
        ) from None


def grid_image(images, nrow=8):
    """uint8 (B, C, H, W) -> PIL image of a grid with white 2-pixel gaps."""
    from torchvision.transforms.functional import to_pil_image
    from torchvision.utils import make_grid

    return to_pil_image(make_grid(images.cpu(), nrow=nrow, padding=2, pad_value=255))


def save_png(x, data_range, path, nrow=8):
    """Samples x (B, C, H, W) in data_range as a PNG grid."""
    image = grid_image(data.to_uint8(x, data_range), nrow)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def save_npz(x, data_range, path, labels=None):
    """Samples as uint8 (N, H, W) (or (N, H, W, C)), with their labels if given."""
    import numpy as np

    images = data.to_uint8(x, data_range).permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, C)
    images = images[..., 0] if images.shape[-1] == 1 else images
    arrays = {"images": images}
    if labels is not None:
        arrays["labels"] = labels.cpu().numpy()

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: given a path, numpy would append ".npz"
            np.savez_compressed(f, **arrays)

    atomic_write(path, write)


def save_gif(frames, path, nrow):
    """frames: a list of (state, denoised) uint8 pairs (B, C, H, W), shown side by side."""
    from PIL import Image

    images = []
    for state, denoised in frames:
        left, right = grid_image(state, nrow), grid_image(denoised, nrow)
        mode = "L" if state.shape[1] == 1 else "RGB"
        frame = Image.new(mode, (left.width * 2 + 8, left.height), "white")
        frame.paste(left.convert(mode), (0, 0))
        frame.paste(right.convert(mode), (left.width + 8, 0))
        images.append(frame)
    images += [images[-1]] * 10  # hold the result

    def write(tmp):
        images[0].save(
            tmp, format="GIF", save_all=True, append_images=images[1:], duration=80, loop=0
        )

    atomic_write(path, write)


def save_text(text, path):
    """A table or log, written atomically."""

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf", "#000000")  # fmt: skip


def log_ticks(lo, hi):
    """1-2-5 values whose log10 lies in [lo, hi]."""
    values = (m * 10**p for p in range(math.floor(lo), math.ceil(hi) + 1) for m in (1, 2, 5))
    return [v for v in values if lo <= math.log10(v) <= hi]


def save_plot(rows, floor, path, title):
    """A log-log line plot of FD against NFE, drawn with PIL."""
    from PIL import Image, ImageDraw

    W, H, left, right, top, bottom = 960, 480, 70, 300, 40, 50
    image = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(image)
    nfes = [r["nfe"] for r in rows]
    fds = [max(r["fd"], 1e-3) for r in rows] + [max(floor, 1e-3)]
    x_lo, x_hi = math.log10(max(1, min(nfes))) - 0.1, math.log10(max(nfes)) + 0.1
    y_lo, y_hi = math.log10(min(fds)) - 0.1, math.log10(max(fds)) + 0.1

    def xy(nfe, fd):
        return (
            left + (math.log10(nfe) - x_lo) / (x_hi - x_lo) * (W - left - right),
            H - bottom - (math.log10(max(fd, 1e-3)) - y_lo) / (y_hi - y_lo) * (H - top - bottom),
        )

    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    for nfe in log_ticks(x_lo, x_hi):
        x = xy(nfe, 10**y_lo)[0]
        draw.line([x, H - bottom, x, H - bottom + 5], fill="black")
        draw.text((x - 8, H - bottom + 8), f"{nfe:g}", fill="black")
    for fd in log_ticks(y_lo, y_hi):
        y = xy(10**x_lo, fd)[1]
        draw.line([left - 5, y, left, y], fill="black")
        draw.text((8, y - 6), f"{fd:g}", fill="black")
    y = xy(10**x_lo, floor)[1]
    draw.line([left, y, W - right, y], fill="gray")
    draw.text((W - right + 8, y - 6), "real-data floor", fill="gray")
    for k, arm in enumerate(dict.fromkeys(r["arm"] for r in rows)):
        points = sorted(xy(r["nfe"], r["fd"]) for r in rows if r["arm"] == arm)
        color = COLORS[k % len(COLORS)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for px, py in points:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
        draw.text((W - right + 8, top + 16 * k), arm, fill=color)
    draw.text((left, 12), title + "; both axes log scale", fill="black")
    draw.text((left + (W - left - right) // 2 - 60, H - 22), "NFE per sample", fill="black")
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
