"""Unlabeled images in, generated question sets out.

- Images come from a folder (searched recursively) or a JSONL manifest (one {"image": path} per
  line, paths relative to the manifest). They are converted to RGB and resized so their pixel count
  lies in [min_pixels, max_pixels] with sides a multiple of 28 (Qwen's patch 14 x merge 2).
  A corrupt image is skipped, logged and counted, never fatal.
- `render_shapes` draws coloured shapes on a grid: tests and the embedded default need no files.
- Question sets (generated, labeled, kept) are JSONL files a person can open; rows point at images by
  path and index, never embed pixels. Writes are atomic (temporary file, then rename).
"""

import json
import logging
import os

from PIL import Image, ImageDraw
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

log = logging.getLogger("visplay")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
PATCH_FACTOR = 28  # patch 14 x spatial merge 2: image sides must be multiples of this


def list_images(source):
    """Absolute paths of the images of a folder (recursive, sorted) or of a JSONL manifest."""
    if source is None or not os.path.exists(source):
        raise FileNotFoundError(f"image source {source!r} does not exist: give a folder of images or a "
                                f".jsonl manifest with one {{\"image\": path}} per line (data.images)")
    if os.path.isdir(source):
        source = os.path.abspath(source)
        paths = sorted(os.path.join(root, name) for root, _, names in os.walk(source) for name in names
                       if name.lower().endswith(IMAGE_EXTENSIONS))
        if not paths:
            raise ValueError(f"no images under {source!r}: looked for files ending in {', '.join(IMAGE_EXTENSIONS)}")
        return paths
    base = os.path.dirname(os.path.abspath(source))
    paths = []
    for number, row in iter_jsonl(source):
        if not isinstance(row, dict) or not isinstance(row.get("image"), str):
            raise ValueError(f"{source}:{number}: expected a string field \"image\" (a path), got {row!r}")
        paths.append(os.path.join(base, row["image"]))
    if not paths:
        raise ValueError(f"manifest {source!r} lists no images")
    return paths


def fit_pixels(image, min_pixels, max_pixels):
    """RGB copy of `image` resized (aspect kept) to sides multiple of 28 and area in [min, max] pixels."""
    image = image.convert("RGB")
    height, width = smart_resize(image.height, image.width, PATCH_FACTOR, min_pixels, max_pixels)
    while height * width > max_pixels and max(height, width) > PATCH_FACTOR:
        # smart_resize lifts a very thin image's short side to 28 after scaling; trim the long side.
        if height >= width:
            height -= PATCH_FACTOR
        else:
            width -= PATCH_FACTOR
    if (width, height) != image.size:
        image = image.resize((width, height), Image.BICUBIC)
    return image


def load_image(path, min_pixels, max_pixels):
    """Open an image (first frame of a GIF), RGB, resized by `fit_pixels`. Raises ValueError if unreadable."""
    try:
        with Image.open(path) as image:
            image.seek(0)
            image.load()
            return fit_pixels(image, min_pixels, max_pixels)
    except (OSError, ValueError, SyntaxError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from None


class ImagePool:
    """The unlabeled images of a run, loaded on demand; unreadable ones are skipped and counted."""

    def __init__(self, paths, min_pixels, max_pixels):
        self.paths = list(paths)
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.bad = set()

    def __len__(self):
        return len(self.paths)

    def load(self, index):
        """The image at `index`, or None (logged once) if it cannot be read."""
        if index in self.bad:
            return None
        try:
            return load_image(self.paths[index], self.min_pixels, self.max_pixels)
        except ValueError as error:
            self.bad.add(index)
            log.warning("skipping image %d: %s (%d unreadable so far)", index, error, len(self.bad))
            return None


COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")


def render_shapes(objects, rows, cols, cell=28, background=(245, 245, 245)):
    """Draw objects on a rows x cols grid of `cell`-pixel cells.

    objects: iterable of (shape, colour, row, col, scale) with shape in SHAPES, colour in COLORS,
    scale in (0, 1] the fraction of the cell the shape spans. Returns a PIL RGB image.
    """
    image = Image.new("RGB", (cols * cell, rows * cell), background)
    draw = ImageDraw.Draw(image)
    for shape, colour, row, col, scale in objects:
        half = cell * scale / 2
        cx, cy = col * cell + cell / 2, row * cell + cell / 2
        box = (cx - half, cy - half, cx + half - 1, cy + half - 1)
        fill = COLORS[colour]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        elif shape == "triangle":
            draw.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
        else:
            raise ValueError(f"unknown shape {shape!r}; shapes are {SHAPES}")
    return image


def iter_jsonl(path):
    """(line number, row) of each non-blank line; a malformed line raises ValueError naming file and line."""
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON: {error}") from None


def read_jsonl(path):
    """Rows of a JSONL file (see `iter_jsonl`)."""
    return [row for _, row in iter_jsonl(path)]


def write_jsonl(path, rows):
    """Write rows atomically: a reader sees the old file or the whole new one, never a torn one."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path, value):
    """Atomic JSON write (temporary file, then rename)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
