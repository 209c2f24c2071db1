"""Trainer: parity with a plain loop, grad clipping, checkpoint round trip, the curated __all__."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import tandem.train
from tandem.train import Trainer
from tests.parity import assert_close_to_reference


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 4, generator=g), torch.randn(5, 1, generator=g)) for _ in range(6)]


def _plain(clip: float | None = None) -> nn.Module:
    model = _net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for x, y in _batches():
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return model


def _trained(clip: float | None = None, **kw: object) -> tuple[Trainer, nn.Module, torch.optim.Optimizer]:
    trainer = Trainer(devices="cpu", progress=False, grad_clip=clip, **kw)  # type: ignore[arg-type]
    inner = _net()
    model, opt = trainer.setup(inner, torch.optim.AdamW(inner.parameters(), lr=1e-2))
    for x, y in _batches():
        opt.zero_grad()
        trainer.backward(nn.functional.mse_loss(model(x), y))
        opt.step()
    return trainer, model, opt


def test_fp32_trainer_equals_plain_loop() -> None:
    want = _plain().state_dict()
    _, model, opt = _trained()
    for name, value in model.state_dict().items():
        assert_close_to_reference(value, want[name], "float32", what=f"{name}: Trainer('32') vs plain loop")
        assert torch.equal(value, want[name])   # same ops in the same order: bit-identical
    assert isinstance(opt, torch.optim.AdamW)


def test_grad_clip_equals_clip_grad_norm_reference() -> None:
    want = _plain(clip=0.05).state_dict()
    trainer, model, _ = _trained(clip=0.05)
    for name, value in model.state_dict().items():
        assert_close_to_reference(value, want[name], "float32", what=f"{name}: grad_clip vs clip_grad_norm_")
    assert trainer.step == 6


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    trainer, model, opt = _trained(run_dir=tmp_path)
    torch.randn(3)                        # move the RNG on, so restoring it is visible
    path = trainer.save(note=torch.tensor([7]))
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == path.name
    assert (path / "model.safetensors").is_file()
    expected_rng = torch.randn(2)
    state = torch.load(path / "state.pt", weights_only=True)   # no pickle needed
    assert state["step"] == 6

    fresh = Trainer(devices="cpu", progress=False, run_dir=tmp_path)
    inner = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    model2, opt2 = fresh.setup(inner, torch.optim.AdamW(inner.parameters(), lr=1e-2))
    extra = fresh.load()
    assert torch.equal(extra["note"], torch.tensor([7])) and fresh.step == 6
    for name, value in model.state_dict().items():
        assert torch.equal(value, model2.state_dict()[name])
    assert torch.equal(torch.randn(2), expected_rng)
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_all_exports_import() -> None:
    for name in tandem.train.__all__:
        assert getattr(tandem.train, name) is not None, name
