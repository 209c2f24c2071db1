"""ResNet-50 image classifier (ImageNet-style preprocessing, top-k softmax predictions).

Weights: random with a fixed seed (0) unless tandem.yaml `weights:` names a `.safetensors` file
(a state dict of `ResNetForImageClassification`) or a folder with `config.json` and
`model.safetensors`. Weights are only ever read with safetensors, never with pickle/torch.load.
Decoding and resizing run in CPU workers (Pillow + numpy); torch and transformers are imported
only in the accelerator worker's `setup`/`predict`.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from PIL import Image

from tandem.errors import InvalidInput
from tandem.model import Model, Request, TensorSpec

if TYPE_CHECKING:
    import torch

NUM_CLASSES = 1000
RESIZE_SHORTER = 256
CROP = 224
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
DEFAULT_MAX_PIXELS = 40_000_000
RANDOM_SEED = 0
_MAX_RESIZED_SIDE = 4096  # beyond it, resample only the crop region


def resolve_device(device: str) -> str:
    """Map `auto` to `cuda` when available, else `cpu`; pass anything else through."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _b64_image(payload: Any) -> bytes:
    """The image bytes of a JSON body `{"image": "<base64>"}` (a `data:` URL prefix is allowed)."""
    if not isinstance(payload, dict) or "image" not in payload:
        raise InvalidInput('JSON body must be {"image": "<base64>"}; or send raw image bytes '
                           "with content type image/* or application/octet-stream")
    data = payload["image"]
    if not isinstance(data, str):
        raise InvalidInput(f'field "image" must be a base64 string, got {type(data).__name__}')
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f'field "image" is not valid base64: {exc}') from None


def image_bytes(request: Request) -> bytes:
    """The encoded image of a request: the raw body, or base64 from a JSON body."""
    if request.json is not None:
        return _b64_image(request.json)
    content_type = request.content_type.split(";")[0].strip().lower()
    if content_type == "application/json" or content_type.endswith("+json"):
        try:
            payload = json.loads(request.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"body is not valid JSON: {exc}") from None
        return _b64_image(payload)
    return request.body


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode JPEG/PNG/... bytes into an RGB image, refusing images over `max_pixels`.

    The size is checked from the header before any pixel is decoded (decompression bombs).
    """
    if not data:
        raise InvalidInput("empty body: send image bytes (JPEG, PNG, ...)")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise InvalidInput(f"image is {width}x{height} = {width * height} pixels; "
                               f"at most {max_pixels} are accepted")
        image.load()
        return image.convert("RGB")
    except InvalidInput:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise InvalidInput(f"could not decode image: {exc}") from None


def resize_and_crop(image: Image.Image, shorter: int = RESIZE_SHORTER, crop: int = CROP) -> Image.Image:
    """Resize the shorter side to `shorter` (bilinear), then take the centred `crop` square.

    Same arithmetic as torchvision's `Resize(256)` + `CenterCrop(224)` on PIL images. When the
    resized image would be huge (extreme aspect ratios), only the crop region is resampled
    (PIL's `box`), which agrees with the full resize to within one uint8 step.
    """
    width, height = image.size
    if width <= height:
        size = (shorter, int(shorter * height / width))
    else:
        size = (int(shorter * width / height), shorter)
    left = round((size[0] - crop) / 2.0)
    top = round((size[1] - crop) / 2.0)
    if max(size) <= _MAX_RESIZED_SIDE:
        image = image.resize(size, Image.Resampling.BILINEAR)
        return image.crop((left, top, left + crop, top + crop))
    sx, sy = width / size[0], height / size[1]
    box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
    return image.resize((crop, crop), Image.Resampling.BILINEAR, box=box)


def to_normalized_chw(image: Image.Image) -> np.ndarray:
    """RGB uint8 HWC -> float32 CHW in [0, 1], normalised with the ImageNet mean and std."""
    pixels = np.asarray(image, dtype=np.float32) * np.float32(1 / 255)
    pixels = (pixels - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)


def read_labels(weights: Path | None) -> list[str]:
    """Class names: `id2label` of the weights folder's config.json, else `LABEL_i`."""
    labels = [f"LABEL_{i}" for i in range(NUM_CLASSES)]
    config = weights / "config.json" if weights is not None and weights.is_dir() else None
    if config is not None and config.is_file():
        id2label = json.loads(config.read_text(encoding="utf-8")).get("id2label") or {}
        for key, name in id2label.items():
            if 0 <= int(key) < NUM_CLASSES:
                labels[int(key)] = str(name)
    return labels


def build_resnet50(weights: Path | None) -> torch.nn.Module:
    """ResNet-50 for 1000 classes: seeded random weights, or `weights` read with safetensors."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    if weights is not None and weights.is_dir():
        model = ResNetForImageClassification.from_pretrained(
            str(weights), local_files_only=True, use_safetensors=True, dtype=torch.float32)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            model = ResNetForImageClassification(ResNetConfig(num_labels=NUM_CLASSES))  # type: ignore[call-arg]
        if weights is not None:
            from safetensors.torch import load_file

            model.load_state_dict(load_file(str(weights)), strict=True)
    if model.config.num_labels != NUM_CLASSES:
        raise ValueError(f"{weights}: {model.config.num_labels} classes, expected {NUM_CLASSES}")
    return model.float().eval()


class ImageClassifier(Model):
    """ResNet-50 classifier: one image in, the top-k classes with softmax scores out."""

    inputs: ClassVar[list[TensorSpec]] = [TensorSpec("pixel_values", "FP32", (3, CROP, CROP))]
    outputs: ClassVar[list[TensorSpec]] = [TensorSpec("logits", "FP32", (NUM_CLASSES,))]
    max_batch_size = 16
    max_batch_delay_ms = 10.0

    def setup_cpu(self) -> None:
        """Read the class names (for postprocess) and the preprocessing limits from params."""
        self._labels = read_labels(self.weights)
        self._max_pixels = int(self.params.get("max_pixels", DEFAULT_MAX_PIXELS))
        self._top_k = max(1, min(NUM_CLASSES, int(self.params.get("top_k", 5))))

    def preprocess(self, request: Request) -> dict[str, np.ndarray]:
        """Decode, resize the shorter side to 256, centre-crop 224, normalise -> (3, 224, 224)."""
        if not hasattr(self, "_labels"):
            self.setup_cpu()
        image = decode_image(image_bytes(request), self._max_pixels)
        return {"pixel_values": to_normalized_chw(resize_and_crop(image))}

    def setup(self, device: str) -> None:
        """Build ResNet-50 (seeded random or safetensors weights) in eval mode on `device`."""
        import torch

        self._device = torch.device(resolve_device(device))
        self._model = build_resnet50(self.weights).to(self._device)

    def predict(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Logits (B, 1000) for pixel values (B, 3, 224, 224)."""
        import torch

        pixels = inputs["pixel_values"].to(self._device, dtype=torch.float32, non_blocking=True)
        return {"logits": self._model(pixel_values=pixels).logits.float()}

    def postprocess(self, outputs: dict[str, np.ndarray], request: Request) -> Any:
        """Top-k `{"label", "index", "score"}` by softmax probability, and which weights ran."""
        if not hasattr(self, "_labels"):
            self.setup_cpu()
        logits = outputs["logits"].astype(np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = np.argsort(-probs, kind="stable")[: self._top_k]
        predictions = [{"label": self._labels[i], "index": int(i), "score": float(probs[i])} for i in top]
        weights = self.weights.name if self.weights is not None else f"random (seed {RANDOM_SEED})"
        return {"predictions": predictions, "weights": weights}
