"""Image classification from a folder of JPEGs with tandem.train (issue 12, workload a).

A small CNN learns which shape each picture shows (scripts/make_image_folder.py draws them). Every sample is a
real JPEG decode (`load`) plus random-resized-crop, flip and colour jitter (`transform`), written with PIL and
numpy, so the data pipeline costs real CPU: the seed's data-loading case, where Tandem's Loader picks the
worker settings by measuring them.

    .venv/bin/python scripts/make_image_folder.py data/shapes
    .venv/bin/python examples/train/image_folder.py --data data/shapes --epochs 3 --run-dir runs/shapes
    tandem train examples/train/image_folder.py --nproc 2 -- --data data/shapes --epochs 3   # DDP, gloo on CPU

The Trainer lines are the usual four: Trainer(...), trainer.setup(model, optimizer), trainer.loader(dataset,
...), trainer.backward(loss). The run folder gets steps.jsonl, train.log, steps.png and a checkpoint.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance
from torch import nn

from tandem.train import Trainer

logger = logging.getLogger(__name__)

MEAN, STD = 0.5, 0.25


class ImageFolderDataset:
    """root/<class>/*.jpg as a tandem.train.SplitDataset: load = read + decode, transform = augment + tensor."""

    def __init__(self, root: str | Path, *, size: int = 128, train: bool = True) -> None:
        self.root = Path(root)
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"no class folders under {self.root} (expected ImageFolder layout root/<class>/)")
        self.files = [(str(f), label) for label, name in enumerate(self.classes)
                      for f in sorted((self.root / name).glob("*.jpg"))]
        self.size = size
        self.train = train

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> tuple[Image.Image, int]:
        """Read the file's bytes and decode the JPEG (the I/O part)."""
        path, label = self.files[index]
        with open(path, "rb") as f:
            data = f.read()
        return Image.open(io.BytesIO(data)).convert("RGB"), label

    def transform(self, sample: tuple[Image.Image, int]) -> tuple[torch.Tensor, int]:
        """Training: random resized crop, horizontal flip, colour jitter; validation: resize. Then to a tensor.
        Uses `random`, which the Loader seeds per sample (so augmentation is reproducible)."""
        img, label = sample
        if self.train:
            img = random_resized_crop(img, self.size)
            if random.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            img = colour_jitter(img, 0.4)
        else:
            img = img.resize((self.size, self.size), Image.Resampling.BILINEAR)
        return to_tensor(img), label


def random_resized_crop(img: Image.Image, size: int, scale: tuple[float, float] = (0.6, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
    """torchvision's RandomResizedCrop: a random area share and aspect ratio, resized to size x size."""
    w, h = img.size
    for _ in range(10):
        area = w * h * random.uniform(*scale)
        aspect = math.exp(random.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = random.randint(0, w - cw), random.randint(0, h - ch)
            return img.resize((size, size), Image.Resampling.BILINEAR, box=(x, y, x + cw, y + ch))
    return img.resize((size, size), Image.Resampling.BILINEAR)   # fallback: the whole image


def colour_jitter(img: Image.Image, strength: float) -> Image.Image:
    """Brightness, contrast and saturation, each by a random factor in [1 - strength, 1 + strength]."""
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhancer(img).enhance(random.uniform(1 - strength, 1 + strength))
    return img


def to_tensor(img: Image.Image) -> torch.Tensor:
    """HWC uint8 -> CHW float, normalized."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return (x.float() / 255.0 - MEAN) / STD


class SmallCNN(nn.Module):
    """Four stride-2 conv blocks, global max pooling (a shape detector fires anywhere), a linear head.

    BatchNorm sees per-rank batch statistics under DDP, so 2 processes on half batches are close to, not
    equal to, one process on the whole batch (the exact-equivalence test uses a model without it).
    """

    def __init__(self, num_classes: int, width: int = 16) -> None:
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans, chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, 3, S, S] -> [B, num_classes]
        return self.head(self.features(x).amax(dim=(2, 3)))


def ensure_data(root: Path, *, size: int = 256) -> None:
    """Generate the default folder when it is missing (local rank 0 writes, the other ranks wait)."""
    done = root / ".complete"
    if done.exists():
        return
    if os.environ.get("LOCAL_RANK", "0") == "0":
        sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
        from make_image_folder import make_image_folder

        logger.warning("%s not found: generating 3000 + 600 JPEGs there", root)
        make_image_folder(root, size=size)
        done.touch()
    while not done.exists():
        time.sleep(0.5)


def evaluate(trainer: Trainer, model: nn.Module, dataset: ImageFolderDataset, batch_size: int,
             num_workers: int | str) -> float:
    """Top-1 accuracy on `dataset` (every rank scores its shard; summed over ranks)."""
    loader = trainer.loader(dataset, batch_size=batch_size, shuffle=False, timed=False, num_workers=num_workers)
    model.eval()
    correct = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for x, y in loader:
            correct[0] += (model(x).argmax(dim=1) == y).sum().item()
            correct[1] += y.numel()
    model.train()
    loader.close()
    if trainer.world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(correct)
    return float(correct[0].item() / max(correct[1].item(), 1.0))


def train(args: argparse.Namespace, loader_kwargs: dict[str, Any] | None = None,
          trainer_kwargs: dict[str, Any] | None = None, train_set: Any = None) -> dict[str, Any]:
    """Train per `args` (see parse_args); returns val accuracy, the trainer's summary and the loader's choice.
    For benchmarks: `loader_kwargs` are explicit Loader settings instead of the auto-tuned ones,
    `trainer_kwargs` extra Trainer arguments (comm=...), `train_set` a dataset to use instead of the folder's
    (it needs a `classes` list; evaluation is then skipped)."""
    if train_set is None:
        data = Path(args.data)
        ensure_data(data)
        train_set = ImageFolderDataset(data / "train", size=args.size, train=True)
        val_set = ImageFolderDataset(data / "val", size=args.size, train=False)
    else:
        val_set, args.eval = None, False
    workers: int | str = "auto" if args.num_workers == "auto" else int(args.num_workers)
    kwargs = dict(loader_kwargs) if loader_kwargs is not None else {"num_workers": workers}

    trainer = Trainer(precision=args.precision, run_dir=args.run_dir, seed=args.seed, progress=args.progress,
                      log_every=args.log_every, **(trainer_kwargs or {}))
    model = SmallCNN(len(train_set.classes), width=args.width)
    if args.compile:
        model.features = trainer.compile(model.features)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    model, optimizer = trainer.setup(model, optimizer)
    loader = trainer.loader(train_set, batch_size=args.batch_size, drop_last=True, **kwargs)

    start = time.perf_counter()
    done = False
    for _epoch in trainer.epochs(args.epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            trainer.backward(loss)
            optimizer.step()
            if args.max_steps and trainer.step >= args.max_steps:
                done = True
                break
        if done:
            break
    train_s = time.perf_counter() - start
    trainer.log.finish_iteration()   # a --max-steps break leaves the last iteration open
    summary, summary_all = trainer.summary(warmup=args.warmup), trainer.summary()
    records = trainer.log.records
    val_workers = loader.settings.num_workers if loader.settings is not None else 0
    accuracy = evaluate(trainer, model, val_set, args.batch_size, val_workers) if val_set is not None and args.eval \
        else None
    checkpoint = trainer.save() if args.run_dir is not None else None
    trainer.finish()
    loader.close()
    result = {"val_accuracy": accuracy, "train_seconds": train_s, "summary": summary,
              "summary_all": summary_all,
              "first_step_time": records[0].time if records else None,
              "compiler_seconds": _compiler_seconds() if args.compile else None,
              "loader_settings": None if loader.settings is None else vars(loader.settings),
              "tune_report": loader.tune_report, "checkpoint": None if checkpoint is None else str(checkpoint),
              "world_size": trainer.world_size, "rank": trainer.rank,
              "threads": torch.get_num_threads(),
              "classes": len(train_set.classes), "train_images": len(train_set)}
    if trainer.is_main:
        logger.info("val accuracy %s", accuracy)
        if loader.tune_report:
            logger.info("%s", loader.tune_report)
    return result


def _compiler_seconds() -> float:
    from tandem.train.compile import compiler_seconds

    return compiler_seconds()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The example's flags."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/shapes", help="ImageFolder root with train/ and val/ (generated if "
                    "missing)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64, help="per process")
    ap.add_argument("--precision", choices=["32", "bf16-mixed", "16-mixed"], default="32")
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--num-workers", default="auto", help="'auto' (measured trial) or a number")
    ap.add_argument("--size", type=int, default=128, help="crop side the model sees")
    ap.add_argument("--width", type=int, default=16, help="channels of the first conv block")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps (0: no limit)")
    ap.add_argument("--warmup", type=int, default=0, help="steps left out of the summary's means")
    ap.add_argument("--compile", action="store_true", help="torch.compile the conv features")
    ap.add_argument("--no-eval", dest="eval", action="store_false", help="skip the validation pass")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--json", default=None, help="write the result as JSON here (rank 0)")
    args = ap.parse_args(argv)
    if args.num_workers != "auto" and not args.num_workers.isdigit():
        ap.error(f"--num-workers must be 'auto' or a number, got {args.num_workers!r}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    result = train(args)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"val accuracy: {result['val_accuracy']}")
        print(json.dumps(result["summary"]))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
