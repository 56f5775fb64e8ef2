"""Tests of data.py: image listing, resizing, loading, JSONL I/O, atomic writes.

Expected sizes are worked out by hand from Qwen's smart_resize rule (arithmetic in the comments)."""

import json
import logging
import os
import re

import numpy as np
import pytest
from PIL import Image

from data import (
    IMAGE_EXTENSIONS,
    ImagePool,
    fit_pixels,
    list_images,
    load_image,
    read_jsonl,
    read_pairs,
    write_json,
    write_jsonl,
)

MIN, MAX = 784, 12544  # config.yaml's model.min_pixels / max_pixels (28*28 and 112*112)

# ----------------------------------------------------------------------------
# list_images


def _save(path, size=(8, 8), colour=(10, 20, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.new("RGB", size, colour)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP",
           ".gif": "GIF"}[os.path.splitext(path)[1].lower()]
    image.save(path, format=fmt)


def test_list_images_folder_recursive_sorted_all_extensions(tmp_path):
    root = tmp_path / "imgs"
    names = ["a.jpg", "B.PNG", "c.jpeg", "sub/d.webp", "sub/deeper/e.bmp", "z.gif", "sub/f.JpG",
             "g.Gif"]
    for name in names:
        _save(str(root / name))
    # ignored: other extensions, an extension only as part of a longer one, no extension
    for name in ["notes.txt", "sub/pic.tiff", "h.png.txt", "sub/deeper/pngfile", "x.svg"]:
        (root / name).write_text("not an image")
    # sorted as full path strings: uppercase < lowercase; 'sub/d.webp' < 'sub/deeper/...' as
    # '.' (0x2e) < 'e'
    expected = ["B.PNG", "a.jpg", "c.jpeg", "g.Gif", "sub/d.webp", "sub/deeper/e.bmp", "sub/f.JpG",
                "z.gif"]
    got = list_images(str(root))
    assert got == [os.path.join(str(root), *n.split("/")) for n in expected]


def test_list_images_every_listed_extension_is_accepted(tmp_path):
    assert set(IMAGE_EXTENSIONS) == {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
    for ext in IMAGE_EXTENSIONS:
        _save(str(tmp_path / f"img{ext.upper()}"))
    got = list_images(str(tmp_path))
    assert (sorted(os.path.basename(p) for p in got)
            == sorted(f"img{e.upper()}" for e in IMAGE_EXTENSIONS))


def test_list_images_relative_folder_gives_absolute_paths(tmp_path, monkeypatch):
    _save(str(tmp_path / "imgs" / "a.png"))
    monkeypatch.chdir(tmp_path)
    assert list_images("imgs") == [str(tmp_path / "imgs" / "a.png")]


def test_list_images_manifest_resolves_relative_to_manifest_folder(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "list.jsonl").write_text('{"image": "imgs/a.png"}\n{"image": "b.jpg", "extra": 1}\n'
                                       f'{{"image": "{tmp_path / "abs.png"}"}}\n')
    monkeypatch.chdir(tmp_path)  # a relative manifest path: rows resolve against data/, not the cwd
    got = list_images(os.path.join("data", "list.jsonl"))
    assert got == [str(folder / "imgs" / "a.png"), str(folder / "b.jpg"), str(tmp_path / "abs.png")]


def test_list_images_missing_path(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        list_images(missing)
    with pytest.raises(FileNotFoundError):
        list_images(None)


def test_list_images_empty_folder_names_folder_and_extensions(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    with pytest.raises(ValueError) as info:
        list_images(str(tmp_path))
    message = str(info.value)
    assert str(tmp_path) in message
    for ext in IMAGE_EXTENSIONS:
        assert ext in message


def test_list_images_manifest_row_without_image_names_file_and_line(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"image": "a.png"}\n{"path": "b.png"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{manifest}:2")):
        list_images(str(manifest))
    manifest.write_text('{"image": 3}\n')  # not a string
    with pytest.raises(ValueError, match=re.escape(f"{manifest}:1")):
        list_images(str(manifest))


def test_list_images_empty_manifest(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n")
    with pytest.raises(ValueError, match=re.escape(str(manifest))):
        list_images(str(manifest))


def test_list_images_manifest_line_number_counts_blank_lines(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"image": "a.png"}\n\n{"path": "b.png"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{manifest}:3")):
        list_images(str(manifest))


def test_list_images_manifest_row_not_an_object(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('"a.png"\n')
    with pytest.raises(ValueError, match=re.escape(f"{manifest}:1")):
        list_images(str(manifest))


# ----------------------------------------------------------------------------
# fit_pixels


@pytest.mark.parametrize("size, min_pixels, max_pixels, expected", [
    # 100x100: round(100/28)=4 -> 112; 112*112 = 12544 <= max -> 112x112
    ((100, 100), MIN, MAX, (112, 112)),
    # w=1000, h=500: 504*1008 > max; beta = sqrt(500000/12544) = 6.3134;
    # h: floor(500/6.3134/28) = floor(2.83) = 2 -> 56;
    # w: floor(1000/6.3134/28) = floor(5.66) = 5 -> 140
    ((1000, 500), MIN, MAX, (140, 56)),
    # w=300, h=200: 196*308 = 60368 > max; beta = sqrt(60000/12544) = 2.1871;
    # h: floor(91.45/28) = 3 -> 84; w: floor(137.17/28) = 4 -> 112
    ((300, 200), MIN, MAX, (112, 84)),
    # w=20, h=10: round -> 28 x 0 = 0 < min; beta = sqrt(784/200) = 1.9799;
    # h: ceil(19.8/28) = 1 -> 28; w: ceil(39.6/28) = 2 -> 56
    ((20, 10), MIN, MAX, (56, 28)),
    # w=100, h=40 with min 3136: round(40/28)=1 -> 28, round(100/28)=4 -> 112;
    # 28*112 = 3136, not < min -> kept
    ((100, 40), 3136, MAX, (112, 28)),
    # w=50, h=30 with min 3136: 28*56 = 1568 < min; beta = sqrt(3136/1500) = 1.4459;
    # h: ceil(43.38/28) = ceil(1.55) = 2 -> 56; w: ceil(72.30/28) = ceil(2.58) = 3 -> 84
    ((50, 30), 3136, MAX, (84, 56)),
])
def test_fit_pixels_sizes_by_hand(size, min_pixels, max_pixels, expected):
    out = fit_pixels(Image.new("RGB", size, (1, 2, 3)), min_pixels, max_pixels)
    assert out.size == expected


def test_fit_pixels_keeps_a_fitting_image_unresampled():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(56, 84, 3), dtype=np.uint8)
    out = fit_pixels(Image.fromarray(pixels), MIN, MAX)
    assert out.size == (84, 56)
    assert np.array_equal(np.asarray(out), pixels)


@pytest.mark.parametrize("min_pixels, max_pixels", [(MIN, MAX), (4 * MIN, 64 * MIN)])
def test_fit_pixels_invariants_over_sizes(min_pixels, max_pixels):
    # aspect ratios up to 4, well inside what [min, max] can hold at 28-pixel granularity
    for width, height in [(1, 1), (13, 29), (28, 28), (57, 100), (100, 57), (199, 60), (240, 320),
                          (401, 400), (640, 480), (480, 640), (800, 200), (37, 148), (1000, 999)]:
        out = fit_pixels(Image.new("RGB", (width, height)), min_pixels, max_pixels)
        w, h = out.size
        assert w % 28 == 0 and h % 28 == 0 and w > 0 and h > 0, (width, height, out.size)
        assert min_pixels <= w * h <= max_pixels, (width, height, out.size)
        # aspect kept to within one 28-pixel step on either side
        assert (w - 28) / (h + 28) <= width / height <= (w + 28) / max(h - 28, 1), (
            width, height, out.size)


def test_fit_pixels_area_at_most_max_for_wide_image():
    out = fit_pixels(Image.new("RGB", (1000, 50)), MIN, MAX)
    w, h = out.size
    assert w * h <= MAX


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "LA", "1", "CMYK"])
def test_fit_pixels_converts_to_rgb(mode):
    image = Image.new(mode, (60, 30))
    out = fit_pixels(image, MIN, MAX)
    assert out.mode == "RGB"
    assert out.size[0] % 28 == 0 and out.size[1] % 28 == 0


def test_fit_pixels_grey_value_preserved_through_rgb():
    out = fit_pixels(Image.new("L", (56, 56), 77), MIN, MAX)
    assert out.getpixel((10, 10)) == (77, 77, 77)


# ----------------------------------------------------------------------------
# load_image / ImagePool


def test_load_image_uses_first_gif_frame(tmp_path):
    path = str(tmp_path / "anim.gif")
    red = Image.new("RGB", (56, 56), (255, 0, 0))
    blue = Image.new("RGB", (56, 56), (0, 0, 255))
    red.save(path, save_all=True, append_images=[blue], duration=100, loop=0)
    with Image.open(path) as check:  # the file really has a blue second frame
        assert check.n_frames == 2
        check.seek(1)
        assert check.convert("RGB").getpixel((5, 5)) == (0, 0, 255)
    image = load_image(path, MIN, MAX)
    assert image.mode == "RGB" and image.size == (56, 56)
    assert image.getpixel((5, 5)) == (255, 0, 0)
    assert image.getpixel((50, 50)) == (255, 0, 0)


def test_load_image_resizes_and_converts(tmp_path):
    path = str(tmp_path / "rgba.png")
    Image.new("RGBA", (300, 200), (0, 200, 0, 128)).save(path)
    image = load_image(path, MIN, MAX)
    assert image.mode == "RGB" and image.size == (112, 84)  # see the (300, 200) case above


def test_load_image_corrupt_file_names_path(tmp_path):
    path = str(tmp_path / "broken.png")
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match=re.escape(path)):
        load_image(path, MIN, MAX)


def test_load_image_truncated_png_names_path(tmp_path):
    good = str(tmp_path / "good.png")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, size=(80, 80, 3), dtype=np.uint8)).save(good)
    data = open(good, "rb").read()
    path = str(tmp_path / "truncated.png")
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(path)):
        load_image(path, MIN, MAX)


def test_load_image_missing_file_names_path(tmp_path):
    path = str(tmp_path / "gone.png")
    with pytest.raises(ValueError, match=re.escape(path)):
        load_image(path, MIN, MAX)


def test_image_pool_skips_counts_and_logs_bad_images(tmp_path, caplog):
    good1, bad, good2 = (str(tmp_path / n) for n in ("a.png", "b.png", "c.png"))
    Image.new("RGB", (56, 56), (1, 2, 3)).save(good1)
    with open(bad, "wb") as f:
        f.write(b"\x89PNG garbage that is not an image" * 10)
    Image.new("RGB", (84, 56), (9, 8, 7)).save(good2)
    pool = ImagePool([good1, bad, good2], MIN, MAX)
    assert len(pool) == 3
    caplog.set_level(logging.WARNING, logger="visplay")
    assert pool.load(0).getpixel((0, 0)) == (1, 2, 3)
    assert pool.bad == set()
    assert pool.load(1) is None
    assert pool.bad == {1}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and bad in warnings[0].getMessage()
    later = pool.load(2)  # good images after a bad one still load
    assert later is not None and later.size == (84, 56) and later.getpixel((0, 0)) == (9, 8, 7)
    assert pool.load(1) is None  # again: still skipped, counted once, logged once
    assert pool.bad == {1}
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


# ----------------------------------------------------------------------------
# JSONL / JSON I/O


def test_read_jsonl_skips_blank_lines_and_names_malformed_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"a": 1}\n\n{"b": [2, 3]}\n')
    assert read_jsonl(str(path)) == [{"a": 1}, {"b": [2, 3]}]
    path.write_text('{"a": 1}\n\n{"b": oops}\n{"c": 3}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:3")):
        read_jsonl(str(path))


def test_write_jsonl_round_trip_and_no_tmp_left(tmp_path):
    path = str(tmp_path / "rows.jsonl")
    rows = [{"id": "0", "question": "How many?", "answer": "3"},
            {"id": "1", "choices": ["a", "ü"]}]
    write_jsonl(path, rows)
    assert os.listdir(tmp_path) == ["rows.jsonl"]
    lines = open(path).read().splitlines()
    assert [json.loads(line) for line in lines] == rows  # one row per line, readable by hand
    write_jsonl(path, rows[:1])  # overwrite
    assert read_jsonl(path) == rows[:1]
    assert os.listdir(tmp_path) == ["rows.jsonl"]


def test_write_json_round_trip_and_no_tmp_left(tmp_path):
    path = str(tmp_path / "state.json")
    write_json(path, {"iteration": 2, "done": ["questioner"]})
    write_json(path, {"iteration": 3, "done": []})
    assert json.load(open(path)) == {"iteration": 3, "done": []}
    assert os.listdir(tmp_path) == ["state.json"]


@pytest.mark.parametrize("writer, value", [(write_jsonl, [{"new": 1}, {"new": 2}]),
                                           (write_json, {"new": 1})])
def test_writes_are_atomic_when_rename_fails(tmp_path, monkeypatch, writer, value):
    path = str(tmp_path / "file")
    original = '{"old": true}\n'
    with open(path, "w") as f:
        f.write(original)

    def crash(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        writer(path, value)
    monkeypatch.undo()
    assert open(path).read() == original


def test_read_pairs_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_pairs(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"original": "a.png", "edited": "b.png"}) + "\n"
                   + json.dumps({"original": "c.png"}) + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: expected string fields"):
        read_pairs(str(bad))
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"original": "x/a.png", "edited": "x/b.png"}) + "\n")
    assert read_pairs(str(good)) == [(str(tmp_path / "x/a.png"), str(tmp_path / "x/b.png"))]
