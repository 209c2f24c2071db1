"""Multi-LoRA: PEFT adapters validated at load, fixed device slots, one gathered pass per projection.

    host (CPU) LRU of loaded adapters, `max_cpu_loras`      device bank, `max_loras` slots + slot 0 (zeros = base)
    name -> AdapterWeights (A^T, B^T * scale per module) -> at[layer, module]: [slots + 1, in, r_max]
                                                            bt[layer, module]: [slots + 1, r_max, out]

A batch carries one bank index per sequence, and each fused projection (q/k/v, o, gate/up, down)
adds its LoRA deltas in one pass whatever the mix of adapters, never a loop over them:

    slots    (default)              each KV slot holds a copy of its sequence's adapter, made when
                                    the sequence joins: bmm(bmm(x, at[:S]), bt[:S]) reads views
    gathered (BGMV style)           bmm(bmm(x, at[idx]), bt[idx])   weights gathered every step
    grouped  (SGMV style)           rows sorted by slot, F.grouped_mm over the bank, rows put back

Modules sharing an input share one A buffer, so x is shrunk once per fused projection. Ranks
below `r_max` are zero-padded, which is exact. Batches where every sequence uses the same adapter
(or none) take a plain matmul (or nothing). `LoraBank._gathered` / `_grouped` are the seam for a
fused GPU kernel (Punica BGMV/SGMV): same inputs, same in-place result. benchmarks/lora.py
measures both forms.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor

from tandem.errors import InvalidInput
from tandem.llm.model import LINEAR_MODULES, LORA_GROUPS, LlamaSpec, LoraHook, tensor_bytes

__all__ = ["AdapterError", "AdapterWeights", "FORMS", "LoraBank", "Segments", "SlotCopies", "load_adapter"]

_REFUSED_FEATURES = {"use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out",
                     "modules_to_save": "modules_to_save", "layers_to_transform": "layers_to_transform",
                     "layer_replication": "layer_replication", "megatron_config": "Megatron layers",
                     "use_qalora": "QALoRA", "trainable_token_indices": "trainable token indices"}


class AdapterError(InvalidInput):
    """An adapter folder that cannot be served (bad format, wrong base model, unsupported feature)."""


@dataclass
class AdapterWeights:
    """One adapter in host memory: per (layer, module) A^T [in, r] and B^T * scale [r, out], fp32."""

    name: str
    path: Path
    rank: int
    factors: dict[tuple[int, str], tuple[Tensor, Tensor]]

    def nbytes(self) -> int:
        return tensor_bytes(t for ab in self.factors.values() for t in ab)

    @property
    def modules(self) -> set[str]:
        return {m for _, m in self.factors}


def _read_config(path: Path, name: str) -> dict[str, object]:
    cfg_path = path / "adapter_config.json"
    if not cfg_path.exists():
        raise AdapterError(f"adapter {name!r}: no adapter_config.json in {path} (expected a PEFT LoRA folder)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (ValueError, OSError) as e:  # JSON or UTF-8 errors, a folder of that name, no permission
        raise AdapterError(f"adapter {name!r}: adapter_config.json is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"adapter {name!r}: adapter_config.json must hold a JSON object, not "
                           f"{type(cfg).__name__}")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type {cfg.get('peft_type')!r} is not supported (LORA only)")
    for key, feature in _REFUSED_FEATURES.items():
        if cfg.get(key):
            raise AdapterError(f"adapter {name!r}: {feature} is not supported ({key}={cfg[key]!r})")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"adapter {name!r}: trained biases (bias={cfg['bias']!r}) are not supported")
    return cfg


def _pattern_value(cfg: dict[str, object], field: str, module_name: str, name: str) -> object | None:
    r"""The value of the first key of `rank_pattern` / `alpha_pattern` matching the module, as PEFT does it.

    PEFT (`peft.utils.other.get_pattern_key`) treats each key as a regex that must match the END of
    the full module name at a dot boundary, `re.match(rf"(.*\.)?({key})$", name)`, and the first
    matching key in config order wins. So 'layers.1.self_attn.q_proj' matches layer 1 only (a
    plain suffix test also matches layer 11), 'proj' matches no module (a suffix test matches
    every one) and 'layers\.[01]\.self_attn\.q_proj' is a regex.
    """
    patterns = cfg.get(field) or {}
    if not isinstance(patterns, dict):
        raise AdapterError(f"adapter {name!r}: {field} must be a mapping, not {patterns!r}")
    for key, value in patterns.items():
        try:
            matched = re.match(rf"(.*\.)?({key})$", module_name)
        except re.error as e:
            raise AdapterError(f"adapter {name!r}: {field} key {key!r} is not a valid regex: {e}") from None
        if matched:
            return value
    return None


def _scale(cfg: dict[str, object], module_name: str, rank: int, name: str) -> float:
    """PEFT's scaling of one module: lora_alpha (or its alpha_pattern value) / r, or / sqrt(r) with rsLoRA."""
    alpha = _pattern_value(cfg, "alpha_pattern", module_name, name)
    field = "lora_alpha" if alpha is None else f"alpha_pattern value for {module_name}"
    alpha = cfg.get("lora_alpha", 8) if alpha is None else alpha
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise AdapterError(f"adapter {name!r}: adapter_config.json {field} must be a finite number, not {alpha!r}")
    rslora = cfg.get("use_rslora")
    if rslora is not None and not isinstance(rslora, bool):
        raise AdapterError(f"adapter {name!r}: adapter_config.json use_rslora must be true or false, not {rslora!r}")
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _check_rank(cfg: dict[str, object], module_name: str, rank: int, name: str) -> None:
    """The rank PEFT would build the module with (rank_pattern, else r) must be the weights' rank."""
    want = _pattern_value(cfg, "rank_pattern", module_name, name)
    if want is None:
        want = cfg.get("r")
    if want is not None and want != rank:
        raise AdapterError(f"adapter {name!r}: {module_name} has rank {rank} in adapter_model.safetensors, but "
                           f"adapter_config.json (r / rank_pattern) gives it rank {want}")


def _parse_key(key: str) -> tuple[int, str, str, str] | None:
    """'base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight' -> (3, 'q_proj', 'A',
    'model.layers.3.self_attn.q_proj'), the last being the module's name as PEFT matches patterns against it."""
    parts = key.split(".")
    if "layers" not in parts or len(parts) < 4 or parts[-1] != "weight" or parts[-2] not in ("lora_A", "lora_B"):
        return None
    i = parts.index("layers")
    return int(parts[i + 1]), parts[-3], parts[-2][-1], ".".join(parts[:-2]).removeprefix("base_model.model.")


def _read_tensors(path: Path, name: str) -> dict[str, Tensor]:
    file = path / "adapter_model.safetensors"
    if not file.exists():
        extra = " (adapter_model.bin is refused: pickled weights are unsafe)" if (path / "adapter_model.bin").exists() \
            else ""
        raise AdapterError(f"adapter {name!r}: no adapter_model.safetensors in {path}{extra}")
    try:
        with safe_open(str(file), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises several types on corrupt files
        raise AdapterError(f"adapter {name!r}: cannot read adapter_model.safetensors: {e}") from None


def _check_pair(name: str, spec: LlamaSpec, layer: int, module: str, a: Tensor, b: Tensor, max_rank: int) -> None:
    if module not in LINEAR_MODULES:
        raise AdapterError(f"adapter {name!r}: target module {module!r} is not supported; "
                           f"supported: {', '.join(LINEAR_MODULES)}")
    if not 0 <= layer < spec.n_layers:
        raise AdapterError(f"adapter {name!r}: layer {layer} does not exist in the base model "
                           f"({spec.n_layers} layers): trained for another base model?")
    d_in, d_out = spec.module_dims(module)
    r = a.shape[0]
    if a.shape != (r, d_in) or b.shape != (d_out, r):
        raise AdapterError(f"adapter {name!r}: layer {layer} {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                           f"the base model needs A [r, {d_in}] and B [{d_out}, r]: trained for another base model?")
    if r > max_rank:
        raise AdapterError(f"adapter {name!r}: rank {r} exceeds max_lora_rank {max_rank} "
                           "(fix: raise max_lora_rank in the server settings)")


def load_adapter(name: str, path: Path, spec: LlamaSpec, max_rank: int) -> AdapterWeights:
    """Read and validate a PEFT LoRA folder for this base model; errors say what is wrong and why."""
    try:
        found = path.is_dir()
    except OSError as e:  # e.g. a name over the file system's limit
        raise AdapterError(f"adapter {name!r}: cannot read folder {path}: {e.strerror}") from None
    if not found:
        raise AdapterError(f"adapter {name!r}: folder {path} not found")
    cfg = _read_config(path, name)
    tensors = _read_tensors(path, name)
    pairs: dict[tuple[int, str], dict[str, Tensor]] = {}
    module_names: dict[tuple[int, str], str] = {}
    for key, t in tensors.items():
        parsed = _parse_key(key)
        if parsed is None:
            raise AdapterError(f"adapter {name!r}: unexpected tensor {key!r} (only lora_A/lora_B of decoder "
                               "layers are supported; embedding or lm_head adapters are not)")
        layer, module, which, module_name = parsed
        pairs.setdefault((layer, module), {})[which] = t
        module_names[(layer, module)] = module_name
    if not pairs:
        raise AdapterError(f"adapter {name!r}: adapter_model.safetensors holds no LoRA weights")
    factors: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"adapter {name!r}: layer {layer} {module} lacks lora_{'B' if 'A' in ab else 'A'}")
        a, b = ab["A"].float(), ab["B"].float()
        _check_pair(name, spec, layer, module, a, b, max_rank)
        _check_rank(cfg, module_names[(layer, module)], a.shape[0], name)
        scale = _scale(cfg, module_names[(layer, module)], a.shape[0], name)
        factors[(layer, module)] = (a.t().contiguous(), (b.t() * scale).contiguous())
    rank = max(a.shape[1] for a, _ in factors.values())
    return AdapterWeights(name, path, rank, factors)


@dataclass(frozen=True)
class Segments:
    """Tokens of adapter sequences sorted by bank slot (SGMV style): no weight is copied."""

    perm: Tensor  # [T] token rows (of the flattened [S * L]) in slot order, base-model rows left out
    offs: Tensor  # [max_loras] int32 cumulative row counts per slot 1..max_loras

    @classmethod
    def build(cls, idx: list[int], L: int, n_slots: int, device: torch.device) -> Segments:
        order = sorted((slot, s) for s, slot in enumerate(idx) if slot)
        perm = torch.tensor([s * L + t for _, s in order for t in range(L)], dtype=torch.long, device=device)
        counts = torch.bincount(torch.tensor([slot for slot, _ in order], dtype=torch.long), minlength=n_slots + 1)
        return cls(perm, (torch.cumsum(counts[1:], 0) * L).to(torch.int32).to(device))


FORMS = ("slots", "gathered", "grouped")


class LoraBank:
    """Device-resident stacked A/B buffers: slot 0 is all zeros (the base model), 1..max_loras hold adapters.

    Modules that share an input (q/k/v, gate/up) share one A buffer, their A^T side by side
    ([slots + 1, in, n_modules * r_max]), so a mixed batch shrinks x once per fused projection.
    """

    def __init__(self, spec: LlamaSpec, max_loras: int, max_rank: int, device: str | torch.device,
                 dtype: torch.dtype, form: str = "gathered") -> None:
        if form not in FORMS:
            raise ValueError(f"LoRA form must be one of {FORMS}, not {form!r}")
        self.spec, self.max_loras, self.max_rank, self.form = spec, max_loras, max_rank, form
        self.at: dict[tuple[int, tuple[str, ...]], Tensor] = {}  # (layer, group) -> [N + 1, in, g * r]
        self.bt: dict[tuple[int, str], Tensor] = {}  # (layer, module) -> [N + 1, r, out]
        for layer in range(spec.n_layers):
            for group in LORA_GROUPS:
                d_in = spec.module_dims(group[0])[0]
                self.at[(layer, group)] = torch.zeros(max_loras + 1, d_in, len(group) * max_rank, device=device,
                                                      dtype=dtype)
                for module in group:
                    d_out = spec.module_dims(module)[1]
                    self.bt[(layer, module)] = torch.zeros(max_loras + 1, max_rank, d_out, device=device, dtype=dtype)
        self.modules_in: list[set[str]] = [set() for _ in range(max_loras + 1)]

    def nbytes(self) -> int:
        return tensor_bytes([*self.at.values(), *self.bt.values()])

    def write(self, slot: int, adapter: AdapterWeights) -> None:
        """Copy an adapter into a slot (1..max_loras), zero-padding its rank; modules it lacks become zeros."""
        assert 1 <= slot <= self.max_loras
        r = self.max_rank
        for (layer, group), at in self.at.items():
            at[slot].zero_()
            for j, module in enumerate(group):
                bt = self.bt[(layer, module)][slot]
                bt.zero_()
                if (layer, module) in adapter.factors:
                    a, b = adapter.factors[(layer, module)]
                    at[slot, :, j * r:j * r + a.shape[1]] = a
                    bt[:b.shape[0]] = b
        self.modules_in[slot] = adapter.modules

    def hook(self, idx: list[int], rows: SlotCopies | None = None, first: int = 0) -> LoraHook | None:
        """The LoRA hook for a batch whose sequence s uses bank slot idx[s] (0 = base model).

        With `rows` (form "slots"), sequence s's adapter was copied to rows[first + s] when it joined,
        so the batch reads a contiguous view and gathers nothing.
        """
        used = sorted(set(idx))
        if used == [0]:
            return None
        modules = set().union(*(self.modules_in[i] for i in used))
        if len(used) == 1:
            return self._single(used[0], modules)
        if self.form == "slots" and rows is not None:
            return rows.hook(first, len(idx), modules)
        if self.form == "grouped":
            return self._grouped(idx, modules)
        return self._gathered(torch.tensor(idx, device=next(iter(self.at.values())).device), modules)

    def _expand(self, y: Tensor, xa: Tensor, layer: int, group: tuple[str, ...], modules: set[str],
                add: Callable[[Tensor, Tensor, Tensor], object]) -> None:
        """For each module: add(its columns of y, its slice of xa [..., r], its B^T bank [N + 1, r, out])."""
        r, start = self.max_rank, 0
        for j, module in enumerate(group):
            bt = self.bt[(layer, module)]
            width = bt.shape[-1]
            if module in modules:
                add(y[..., start:start + width], xa[..., j * r:(j + 1) * r], bt)
            start += width

    def _single(self, one: int, modules: set[str]) -> LoraHook:
        def apply(layer: int, group: tuple[str, ...], x: Tensor, y: Tensor) -> None:
            if modules.isdisjoint(group):
                return
            xa = x @ self.at[(layer, group)][one]  # [S, L, g * r]
            self._expand(y, xa, layer, group, modules, lambda cols, h, bt: cols.add_(h @ bt[one]))
        return apply

    def _gathered(self, index: Tensor, modules: set[str]) -> LoraHook:
        def apply(layer: int, group: tuple[str, ...], x: Tensor, y: Tensor) -> None:
            if modules.isdisjoint(group):
                return
            xa = torch.bmm(x, self.at[(layer, group)][index])  # [S, L, g * r]: weights gathered per sequence
            self._expand(y, xa, layer, group, modules, lambda cols, h, bt: cols.add_(torch.bmm(h, bt[index])))
        return apply

    def _grouped(self, idx: list[int], modules: set[str]) -> LoraHook:
        segs: dict[int, Segments] = {}  # by L (prefill and decode calls differ)
        device = next(iter(self.at.values())).device

        def apply(layer: int, group: tuple[str, ...], x: Tensor, y: Tensor) -> None:
            if modules.isdisjoint(group):
                return
            S, L, _ = x.shape
            seg = segs.get(L) or segs.setdefault(L, Segments.build(idx, L, self.max_loras, device))
            rows = x.reshape(S * L, -1)[seg.perm]  # [T, in], slot-sorted
            xa = F.grouped_mm(rows, self.at[(layer, group)][1:], offs=seg.offs)  # [T, g * r]
            self._expand(y.view(S * L, -1), xa, layer, group, modules, lambda cols, h, bt: cols.index_add_(
                0, seg.perm, F.grouped_mm(h.contiguous(), bt[1:], offs=seg.offs)))  # rows back in batch order
        return apply


class SlotCopies:
    """Each KV slot's adapter, copied from the bank when its sequence joins (form "slots").

    A sequence keeps its adapter for hundreds of decode steps, so copying it once at join time
    replaces a per-step gather: decode reads `at[:S]`, a view. Costs max_batch_size adapter copies
    of memory (`nbytes`, logged at start); rows move with the KV cache when it is compacted.
    """

    def __init__(self, bank: LoraBank, slots: int) -> None:
        self.bank = bank
        self.at = {k: t.new_zeros(slots, *t.shape[1:]) for k, t in bank.at.items()}
        self.bt = {k: t.new_zeros(slots, *t.shape[1:]) for k, t in bank.bt.items()}

    def nbytes(self) -> int:
        return tensor_bytes([*self.at.values(), *self.bt.values()])

    def assign(self, row: int, bank_slot: int) -> None:
        for key, t in self.at.items():
            t[row] = self.bank.at[key][bank_slot]
        for mkey, t in self.bt.items():
            t[row] = self.bank.bt[mkey][bank_slot]

    def move(self, src: int, dst: int) -> None:
        for t in [*self.at.values(), *self.bt.values()]:
            t[dst] = t[src]

    def hook(self, first: int, n: int, modules: set[str]) -> LoraHook:
        at, bt, bank = self.at, self.bt, self.bank

        def apply(layer: int, group: tuple[str, ...], x: Tensor, y: Tensor) -> None:
            if modules.isdisjoint(group):
                return
            xa = torch.bmm(x, at[(layer, group)][first:first + n])  # [S, L, g * r]; the weights are a view
            r, start = bank.max_rank, 0
            for j, module in enumerate(group):
                b = bt[(layer, module)]
                if module in modules:
                    y[..., start:start + b.shape[-1]].baddbmm_(xa[..., j * r:(j + 1) * r], b[first:first + n])
                start += b.shape[-1]
        return apply
