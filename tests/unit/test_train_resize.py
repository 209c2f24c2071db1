"""`tandem data resize` and the local-disk dataset cache."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from PIL import Image
from typer.testing import CliRunner

from tandem.train.cache import cache_dataset_folder
from tandem.train.resize import register, resize_folder


def _tree(root: Path) -> None:
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    Image.new("RGB", (400, 200), (200, 10, 10)).save(root / "cat" / "big.jpg", quality=95)
    Image.new("RGBA", (100, 300), (0, 0, 255, 128)).save(root / "dog" / "tall.png")
    Image.new("RGB", (64, 48)).save(root / "dog" / "small.jpg")
    (root / "labels.txt").write_text("cat\ndog\n")
    (root / "cat" / "broken.jpg").write_bytes(b"not a jpeg")


def test_resize_keeps_layout_and_aspect(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    _tree(src)
    result = resize_folder(src, dst, 128, workers=2)
    assert (result.resized, result.copied_small, result.copied_other) == (2, 1, 1)
    assert result.failed is not None and len(result.failed) == 1 and "broken.jpg" in result.failed[0]
    with Image.open(dst / "cat" / "big.jpg") as im:
        assert im.size == (128, 64) and im.format == "JPEG"
    with Image.open(dst / "dog" / "tall.png") as im:
        assert im.size == (43, 128) and im.mode == "RGBA"
    assert (dst / "dog" / "small.jpg").read_bytes() == (src / "dog" / "small.jpg").read_bytes()
    assert (dst / "labels.txt").read_text() == "cat\ndog\n"
    again = resize_folder(src, dst, 128, workers=1)   # re-run: everything up to date
    assert again.kept == 4 and again.resized == 0


def test_cli_prints_counts_and_seconds(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _tree(src)
    (src / "cat" / "broken.jpg").unlink()
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)   # a second command keeps `data` a sub-command, as in tandem's app
    out = CliRunner().invoke(app, ["data", "resize", str(src), str(tmp_path / "dst"), "--max-side", "100",
                                   "--workers", "1", "--quality", "80"])
    assert out.exit_code == 0, out.output
    assert "resized 2" in out.output and " s" in out.output
    bad = CliRunner().invoke(app, ["data", "resize", str(tmp_path / "nope"), str(tmp_path / "d2"),
                                   "--max-side", "100"])
    assert bad.exit_code == 2 and "does not exist" in bad.output


def test_cache_copies_once_reuses_and_recopies_on_change(tmp_path: Path) -> None:
    src, cache = tmp_path / "nas" / "data", tmp_path / "cache"
    (src / "a").mkdir(parents=True)
    (src / "a" / "x.bin").write_bytes(b"1234")
    first = cache_dataset_folder(src, cache)
    assert first.parent == cache and (first / "a" / "x.bin").read_bytes() == b"1234"
    os.utime(first / "a" / "x.bin", ns=(0, 0))   # proves the second call does not copy again
    assert cache_dataset_folder(src, cache) == first
    assert os.stat(first / "a" / "x.bin").st_mtime_ns == 0
    (src / "a" / "y.bin").write_bytes(b"new")
    second = cache_dataset_folder(src, cache)
    assert second != first and (second / "a" / "y.bin").read_bytes() == b"new"
    assert not first.exists()   # the stale copy is removed
    assert [p.name for p in cache.iterdir() if p.name.startswith(".") and "tmp" in p.name] == []
