"""Files on disk: unlabeled images in; JSONL rows and folders out, written atomically.

- Images come from a folder (searched recursively) or a JSONL manifest (one {"image": path} per
  line, paths relative to the manifest). They are converted to RGB and resized so their pixel count
  lies in [min_pixels, max_pixels] with sides a multiple of 28 (Qwen's patch 14 x merge 2).
  A corrupt image is skipped, logged and counted, never fatal.
- Question sets (generated, labeled, kept) are JSONL files a person can open; rows point at images
  by path and index, never embed pixels.
- `atomic_path`: every file and folder a run writes is written under a temporary name and renamed
  into place, so one that exists is complete (the run loop resumes on that fact).
"""

import json
import logging
import os
import shutil
from contextlib import contextmanager

from PIL import Image

log = logging.getLogger("visplay")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
PATCH_FACTOR = 28  # patch 14 x spatial merge 2: image sides must be multiples of this


# ----------------------------------------------------------------------------
# Images


def list_images(source):
    """Absolute paths of the images of a folder (recursive, sorted) or of a JSONL manifest."""
    if source is None or not os.path.exists(source):
        raise FileNotFoundError(f"image source {source!r} does not exist: give a folder of images "
                                "or a .jsonl manifest with one {\"image\": path} per line")
    if os.path.isdir(source):
        source = os.path.abspath(source)
        paths = sorted(os.path.join(root, name) for root, _, names in os.walk(source)
                       for name in names if name.lower().endswith(IMAGE_EXTENSIONS))
        if not paths:
            raise ValueError(f"no images under {source!r}: looked for files ending in "
                             f"{', '.join(IMAGE_EXTENSIONS)}")
        return paths
    if source.lower().endswith(IMAGE_EXTENSIONS):
        raise ValueError(f"{source!r} is one image: give a folder of images or a .jsonl manifest "
                         "with one {\"image\": path} per line")
    base = os.path.dirname(os.path.abspath(source))
    paths = []
    for number, row in iter_jsonl(source):
        if not isinstance(row, dict) or not isinstance(row.get("image"), str):
            raise ValueError(f"{source}:{number}: expected a string field \"image\" (a path), "
                             f"got {row!r}")
        paths.append(os.path.join(base, row["image"]))
    if not paths:
        raise ValueError(f"manifest {source!r} lists no images")
    return paths


def fit_pixels(image, min_pixels, max_pixels):
    """RGB copy of `image` resized (aspect kept) to sides multiple of 28 and area in [min, max]."""
    # Qwen's own rounding rule; imported here, so that reading files never loads transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

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
    """Open an image (first frame of a GIF), RGB, resized by `fit_pixels`.

    Raises ValueError, naming the file, if it cannot be read.
    """
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

    def load_many(self, indices):
        """The images at `indices`; an unreadable one is replaced by the next readable one."""
        images = []
        for index in indices:
            for offset in range(len(self)):
                image = self.load((index + offset) % len(self))
                if image is not None:
                    images.append(image)
                    break
            else:
                raise RuntimeError(f"no readable image in the pool ({len(self.bad)} unreadable)")
        return images


def read_pairs(manifest):
    """(original, edited) absolute paths from a JSONL manifest, one {"original": path, "edited":
    path} per line, paths relative to the manifest. A malformed line stops with its number."""
    if not os.path.isfile(manifest):
        raise FileNotFoundError(f"pairs manifest {manifest!r} does not exist: give a .jsonl file "
                                "with one {\"original\": path, \"edited\": path} per line")
    base = os.path.dirname(os.path.abspath(manifest))
    pairs = []
    for number, row in iter_jsonl(manifest):
        if not (isinstance(row, dict) and isinstance(row.get("original"), str)
                and isinstance(row.get("edited"), str)):
            raise ValueError(f"{manifest}:{number}: expected string fields \"original\" and "
                             f"\"edited\" (paths), got {json.dumps(row)[:120]}")
        pairs.append((os.path.join(base, row["original"]), os.path.join(base, row["edited"])))
    if not pairs:
        raise ValueError(f"pairs manifest {manifest!r} lists no pairs")
    return pairs


# ----------------------------------------------------------------------------
# JSONL rows


def iter_jsonl(path):
    """(line number, row) of each non-blank line; a malformed line raises ValueError naming file
    and line."""
    with open(path) as f:
        number = 0
        try:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not valid JSON: {error}") from None
        except UnicodeDecodeError:
            raise ValueError(f"{path}:{number + 1}: not text (a binary file?): expected JSON "
                             "lines") from None


def read_jsonl(path):
    """Rows of a JSONL file (see `iter_jsonl`)."""
    return [row for _, row in iter_jsonl(path)]


def write_jsonl(path, rows):
    """Write rows, one JSON object per line, atomically (`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_json(path, value):
    """Write one JSON value, indented, atomically (`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(value, f, indent=2)


# ----------------------------------------------------------------------------
# Atomic writes


@contextmanager
def atomic_path(path):
    """Write a file or a folder at `path` so that a reader sees the old one or the whole new one.

        with atomic_path("questions_v1.jsonl") as tmp:
            ...  # write the file (or make and fill the folder) `tmp`

    `tmp` is `path` + ".tmp" (a stale one from a killed run is removed first). When the block ends
    normally, `move_into_place` renames it to `path`; when it raises, `tmp` is removed and `path`
    is left as it was.
    """
    path = os.path.normpath(path)
    tmp = path + ".tmp"
    remove_path(tmp)
    try:
        yield tmp
    except BaseException:
        remove_path(tmp)
        raise
    move_into_place(tmp, path)


def move_into_place(tmp, path):
    """Rename a finished file or folder `tmp` to `path`, replacing what is there.

    The file, or every file of the folder and the folder itself, is fsynced first, and the parent
    folder after the rename, so a power loss cannot leave a renamed but empty or torn file. A folder
    that already exists at `path` is first moved aside to `path.old` (a folder cannot be renamed
    over a non-empty one), then deleted.
    """
    path = os.path.normpath(path)
    if os.path.isdir(tmp):
        for folder, _, files in os.walk(tmp):
            for name in files:
                _fsync(os.path.join(folder, name))
            _fsync(folder)
    elif os.path.isfile(tmp):
        _fsync(tmp)
    if os.path.isdir(tmp) and os.path.exists(path):
        old = path + ".old"
        remove_path(old)
        os.replace(path, old)
        os.replace(tmp, path)
        remove_path(old)
    else:
        os.replace(tmp, path)
    _fsync(os.path.dirname(path) or ".")


def _fsync(path):
    """Flush a file's (or a folder's entries') writes to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_path(path):
    """Delete a file or a folder if it exists."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)
