"""Function steps of the `classifier` pipeline (classifier.py): the shapes data set.

    make_data   an ImageFolder of JPEGs (scripts/make_image_folder.py) of the classes shapes_model.py serves,
                plus calibration/ (request files for `tandem optimize`) and smoke/ (one image per class)
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from shapes_model import CLASSES, SIZE

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def make_data(out: Path, train: int = 480, val: int = 96, calibration: int = 32, seed: int = 0) -> dict[str, str]:
    """Write out/train/<class>/*.jpg, out/val/..., out/calibration/*.jpg and out/smoke/<class>.jpg."""
    sys.path.insert(0, str(SCRIPTS))
    from make_image_folder import make_image_folder

    make_image_folder(out, train, val, seed, size=SIZE, classes=list(CLASSES), processes=1)
    (out / ".complete").touch()   # image_folder.py's ensure_data: the folder is whole, generate nothing
    val_files = sorted((out / "val").rglob("*.jpg"))
    (out / "calibration").mkdir()
    for i, f in enumerate(val_files[:calibration]):
        shutil.copyfile(f, out / "calibration" / f"{i:03d}.jpg")
    (out / "smoke").mkdir()
    for name in CLASSES:
        shutil.copyfile(sorted((out / "val" / name).glob("*.jpg"))[0], out / "smoke" / f"{name}.jpg")
    return {"images": str(train + val)}
