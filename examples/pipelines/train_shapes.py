"""Train the shape classifier and write it as a model-repository entry: a `tandem train` script.

    tandem train train_shapes.py --data DATA --out ENTRY --epochs 3

Training is examples/train/image_folder.py's (`train(args)`: Trainer, deterministic loader, SmallCNN); the entry is
shapes_model.py as model.py, image_folder.py as network.py, the weights as model.safetensors, the validation
accuracy in metrics.json, DATA/calibration as calibration/ (what `tandem optimize` calibrates on by default).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path

import shapes_model
import yaml

IMAGE_FOLDER = Path(__file__).resolve().parents[1] / "train" / "image_folder.py"


def _image_folder():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("image_folder_example", IMAGE_FOLDER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def write_entry(out: Path, weights: Path, width: int, metrics: dict[str, object], calibration: Path | None) -> None:
    """The entry folder: model.py, network.py, model.safetensors, tandem.yaml, metrics.json, calibration/."""
    out.mkdir(parents=True)
    shutil.copyfile(Path(shapes_model.__file__), out / "model.py")
    shutil.copyfile(IMAGE_FOLDER, out / "network.py")
    shutil.copyfile(weights, out / "model.safetensors")
    settings = {"name": "shapes", "weights": "model.safetensors", "params": {"width": width},
                "batching": {"max_batch_size": 8, "max_batch_delay_ms": 2}, "timeout_s": 30}
    (out / "tandem.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if calibration is not None and calibration.is_dir():
        shutil.copytree(calibration, out / "calibration")


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="ImageFolder root with train/ and val/")
    ap.add_argument("--out", type=Path, required=True, help="entry folder to write")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--seed", type=int, default=0)
    ns = ap.parse_args(argv)
    image_folder = _image_folder()
    with tempfile.TemporaryDirectory() as run_dir:
        args = image_folder.parse_args(["--data", str(ns.data), "--epochs", str(ns.epochs), "--size",
                                        str(shapes_model.SIZE), "--width", str(ns.width), "--batch-size",
                                        str(ns.batch_size), "--lr", str(ns.lr), "--seed", str(ns.seed),
                                        "--num-workers", "0", "--no-progress", "--run-dir", run_dir])
        result = image_folder.train(args)
        if result["rank"] == 0:
            metrics = {"val_accuracy": result["val_accuracy"], "train_seconds": result["train_seconds"]}
            write_entry(ns.out, Path(result["checkpoint"]) / "model.safetensors", ns.width, metrics,
                        ns.data / "calibration")
            print(f"val accuracy {result['val_accuracy']:.3f} after {result['train_seconds']:.1f}s; entry: {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
