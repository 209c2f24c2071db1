"""A shape classifier served by Tandem: examples/train/image_folder.py's SmallCNN on 64x64 images.

train_shapes.py writes a model-repository entry around this file: model.py (a copy of it), network.py (a copy of
image_folder.py, for SmallCNN), model.safetensors and tandem.yaml. `tandem optimize` turns such an entry into one
served by ONNX Runtime (runtime: onnxruntime), which keeps this file's preprocess and postprocess only.

    curl -s localhost:8000/predictions/shapes -H 'content-type: image/jpeg' --data-binary @circle.jpg
    {"label": "circle", "score": 0.98, "scores": {"circle": 0.98, ...}}
"""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from PIL import Image

from tandem.errors import InvalidInput
from tandem.model import Model, Request, TensorSpec

if TYPE_CHECKING:
    import torch

SIZE = 64
CLASSES = ("circle", "cross", "square", "triangle")   # sorted: image_folder.py numbers the class folders so
MEAN, STD = 0.5, 0.25   # image_folder.to_tensor's normalisation


def to_pixels(data: bytes) -> np.ndarray:
    """Encoded image bytes -> float32 CHW (3, SIZE, SIZE), normalised as in training."""
    try:
        image = Image.open(io.BytesIO(data)).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidInput(f"send image bytes (JPEG, PNG, ...): {exc}") from None
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return np.ascontiguousarray(((pixels - MEAN) / STD).transpose(2, 0, 1), dtype=np.float32)


class ShapeClassifier(Model):
    """One image in, the shape it shows out (softmax over CLASSES)."""

    task = "image-classification"
    inputs: ClassVar[list[TensorSpec]] = [TensorSpec("pixels", "FP32", (3, SIZE, SIZE))]
    outputs: ClassVar[list[TensorSpec]] = [TensorSpec("logits", "FP32", (len(CLASSES),))]
    max_batch_size = 8
    max_batch_delay_ms = 2.0

    def preprocess(self, request: Request) -> dict[str, np.ndarray]:
        """Decode, resize to SIZE x SIZE, normalise."""
        return {"pixels": to_pixels(request.body)}

    def setup(self, device: str) -> None:
        """SmallCNN (from network.py beside this file) with the entry's safetensors weights."""
        import torch
        from safetensors.torch import load_file

        spec = importlib.util.spec_from_file_location("shapes_network", Path(__file__).with_name("network.py"))
        assert spec is not None and spec.loader is not None
        network = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(network)
        self._device = torch.device("cpu" if device == "auto" else device)
        self._net = network.SmallCNN(len(CLASSES), width=int(self.params.get("width", 16)))
        if self.weights is None:
            raise ValueError("set weights: model.safetensors in tandem.yaml")
        self._net.load_state_dict(load_file(str(self.weights)))
        self._net.to(self._device).eval()

    def predict(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Logits [B, classes] for pixels [B, 3, SIZE, SIZE]."""
        import torch

        with torch.no_grad():
            return {"logits": self._net(inputs["pixels"].to(self._device)).float()}

    def postprocess(self, outputs: dict[str, np.ndarray], request: Request) -> Any:
        """The most likely label, its probability and every class's."""
        logits = outputs["logits"].astype(np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        best = int(probs.argmax())
        return {"label": CLASSES[best], "score": float(probs[best]),
                "scores": {c: round(float(p), 6) for c, p in zip(CLASSES, probs)}}
