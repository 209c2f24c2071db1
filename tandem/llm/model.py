"""A Llama-architecture decoder (Llama, Mistral, Qwen2) as plain functions over a weight dict.

Why not transformers' modules: the engine needs three things they do not give together —
a slot-indexed KV cache shared by requests that join and leave between steps, a LoRA delta
gathered per sequence inside every projection, and no per-step allocation beyond the
activations. Parity with `transformers` (and PEFT) is tested to 1e-4 in fp32.

Shapes: S sequences, L tokens per sequence in this call (prompt length in prefill, 1 in decode),
H query heads, K key/value heads, D head dim, E hidden size.

    cache.k[layer]: [slots, K, max_len, D]   row `slot` holds one sequence's keys, positions 0..len-1
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor

from tandem.errors import ConfigError

__all__ = ["KVCache", "LlamaSpec", "LlamaWeights", "LINEAR_MODULES", "LORA_GROUPS", "LoraHook", "forward",
           "load_weights", "tensor_bytes"]

LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}

# A LoRA hook: (layer, modules sharing the input, x [S, L, in], y [S, L, sum of outs]) adds each
# module's delta into its columns of y, in place. Called once per fused projection.
LoraHook = Callable[[int, tuple[str, ...], Tensor, Tensor], None]
LORA_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class LlamaSpec:
    """The architecture numbers of one checkpoint, read from its `config.json`."""

    arch: str
    vocab_size: int
    hidden: int
    intermediate: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    max_positions: int
    tie_embeddings: bool
    qkv_bias: bool
    eos_token_ids: tuple[int, ...]
    sliding_window: int | None = None

    @classmethod
    def from_folder(cls, folder: Path) -> LlamaSpec:
        path = folder / "config.json"
        if not path.exists():
            raise ConfigError(f"{folder}: no config.json (fix: point at a Hugging Face model folder)")
        cfg = json.loads(path.read_text())
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        arch = _ARCHS.get(archs[0])
        if arch is None:
            raise ConfigError(f"{path}: architecture {archs[0]!r} is not supported; supported: {sorted(_ARCHS)}")
        scaling = cfg.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            raise ConfigError(f"{path}: rope_scaling {scaling!r} is not supported (only the default RoPE)")
        if cfg.get("mlp_bias") or cfg.get("attention_bias"):
            raise ConfigError(f"{path}: attention_bias/mlp_bias are not supported")
        n_heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", arch == "mistral") else None
        return cls(arch=arch, vocab_size=cfg["vocab_size"], hidden=cfg["hidden_size"],
                   intermediate=cfg["intermediate_size"], n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
                   n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
                   rms_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=cfg.get("rope_theta", 10000.0),
                   max_positions=cfg.get("max_position_embeddings", 2048),
                   tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), qkv_bias=arch == "qwen2",
                   eos_token_ids=eos_ids, sliding_window=window)

    def module_dims(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of one linear module of a decoder layer."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return {"q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                "o_proj": (q, self.hidden), "gate_proj": (self.hidden, self.intermediate),
                "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden)}[module]


@dataclass
class LayerWeights:
    ln1: Tensor  # [E]
    ln2: Tensor  # [E]
    qkv: Tensor  # [(H + 2K) * D, E]   q, k, v fused: one matmul
    qkv_bias: Tensor | None
    o: Tensor  # [E, H * D]
    gate_up: Tensor  # [2 * I, E]        gate and up fused
    down: Tensor  # [E, I]


@dataclass
class LlamaWeights:
    """Every tensor of the model, on its device, in its compute dtype."""

    spec: LlamaSpec
    embed: Tensor  # [V, E]
    layers: list[LayerWeights]
    norm: Tensor  # [E]
    lm_head: Tensor  # [V, E]
    inv_freq: Tensor  # [D / 2] fp32

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def nbytes(self) -> int:
        tensors = [self.embed, self.norm, self.lm_head]
        for lw in self.layers:
            tensors += [lw.ln1, lw.ln2, lw.qkv, lw.o, lw.gate_up, lw.down]
            if lw.qkv_bias is not None:
                tensors.append(lw.qkv_bias)
        return tensor_bytes({id(t): t for t in tensors}.values())  # a tied lm_head is the embedding: count once


def _read_safetensors(folder: Path) -> dict[str, Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{folder}: no *.safetensors weights (pickled .bin checkpoints are refused for safety)")
    out: dict[str, Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                out[k.removeprefix("model.")] = fh.get_tensor(k)
    return out


def load_weights(folder: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
                 ) -> LlamaWeights:
    """Load a Hugging Face Llama/Mistral/Qwen2 folder (safetensors only) into fused, device-resident tensors."""
    spec = LlamaSpec.from_folder(folder)
    raw = _read_safetensors(folder)

    def take(name: str) -> Tensor:
        if name not in raw:
            raise ConfigError(f"{folder}: weight {name!r} missing from the safetensors files")
        return raw[name].to(device=device, dtype=dtype)

    layers = []
    for i in range(spec.n_layers):
        p = f"layers.{i}."
        qkv = torch.cat([take(p + f"self_attn.{m}.weight") for m in ("q_proj", "k_proj", "v_proj")])
        bias = (torch.cat([take(p + f"self_attn.{m}.bias") for m in ("q_proj", "k_proj", "v_proj")])
                if spec.qkv_bias else None)
        gate_up = torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
        layers.append(LayerWeights(take(p + "input_layernorm.weight"), take(p + "post_attention_layernorm.weight"),
                                   qkv, bias, take(p + "self_attn.o_proj.weight"), gate_up,
                                   take(p + "mlp.down_proj.weight")))
    embed = take("embed_tokens.weight")
    lm_head = embed if spec.tie_embeddings or "lm_head.weight" not in raw else take("lm_head.weight")
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, spec.head_dim, 2, dtype=torch.int64).float()
                                          / spec.head_dim))
    return LlamaWeights(spec, embed, layers, take("norm.weight"), lm_head, inv_freq.to(device))


@dataclass
class KVCache:
    """Preallocated keys and values: a fixed number of sequence slots of `max_len` positions each."""

    k: list[Tensor]  # per layer [slots, K, max_len, D]
    v: list[Tensor]

    @classmethod
    def allocate(cls, spec: LlamaSpec, slots: int, max_len: int, device: str | torch.device,
                 dtype: torch.dtype) -> KVCache:
        shape = (slots, spec.n_kv_heads, max_len, spec.head_dim)
        return cls([torch.zeros(shape, device=device, dtype=dtype) for _ in range(spec.n_layers)],
                   [torch.zeros(shape, device=device, dtype=dtype) for _ in range(spec.n_layers)])

    def nbytes(self) -> int:
        return tensor_bytes(self.k + self.v)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot `src`'s first `length` positions into slot `dst` (compaction after a finish)."""
        for t in self.k + self.v:
            t[dst, :, :length] = t[src, :, :length]


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # Computed in fp32 like transformers' LlamaRMSNorm, then cast back.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: [S, heads, L, D]; cos/sin: [S, 1, L, D]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _rope_tables(w: LlamaWeights, positions: Tensor) -> tuple[Tensor, Tensor]:
    # positions: [S, L] -> cos, sin: [S, 1, L, D]
    freqs = positions[..., None].float() * w.inv_freq  # [S, L, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(w.dtype)[:, None], emb.sin().to(w.dtype)[:, None]


def _with_lora(y: Tensor, x: Tensor, lora: LoraHook | None, layer: int, names: tuple[str, ...]) -> Tensor:
    """y (the fused projection of x) plus each module's LoRA delta in its column range."""
    if lora is not None:
        lora(layer, names, x, y)
    return y


def _attention(w: LlamaWeights, lw: LayerWeights, i: int, x: Tensor, cos: Tensor, sin: Tensor,
               cache: KVCache, slots: Tensor, starts: Tensor, mask: Tensor | None, lora: LoraHook | None) -> Tensor:
    # mask: None in prefill; decode: [S, 1, 1, n_ctx] bool, position < length (built once per forward)
    spec = w.spec
    S, L, _ = x.shape
    H, K, D = spec.n_heads, spec.n_kv_heads, spec.head_dim
    qkv = _with_lora(F.linear(x, lw.qkv, lw.qkv_bias), x, lora, i, LORA_GROUPS[0])  # [S, L, (H + 2K) * D]
    q, k, v = qkv.view(S, L, H + 2 * K, D).transpose(1, 2).split((H, K, K), dim=1)  # [S, *, L, D]
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    if mask is None:  # prefill: every sequence starts at position 0 (starts == 0), right-padded to L
        cache.k[i][slots, :, :L] = k
        cache.v[i][slots, :, :L] = v
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=K != H)
    else:  # decode: one new token per sequence at position starts[s]; slots are 0..S-1 (compacted)
        n_ctx = mask.shape[-1]
        cache.k[i][slots, :, starts] = k[:, :, 0]
        cache.v[i][slots, :, starts] = v[:, :, 0]
        keys, values = cache.k[i][:S, :, :n_ctx], cache.v[i][:S, :, :n_ctx]  # [S, K, n_ctx, D] views, no copy
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=K != H)
    out = out.transpose(1, 2).reshape(S, L, H * D)
    return _with_lora(F.linear(out, lw.o), out, lora, i, LORA_GROUPS[1])


def _mlp(w: LlamaWeights, lw: LayerWeights, i: int, x: Tensor, lora: LoraHook | None) -> Tensor:
    n = w.spec.intermediate
    gu = _with_lora(F.linear(x, lw.gate_up), x, lora, i, LORA_GROUPS[2])  # [S, L, 2I]
    h = F.silu(gu[..., :n]) * gu[..., n:]
    return _with_lora(F.linear(h, lw.down), h, lora, i, LORA_GROUPS[3])


def forward(w: LlamaWeights, tokens: Tensor, cache: KVCache, slots: Tensor, starts: Tensor, lengths: Tensor,
            last: Tensor, lora: LoraHook | None = None, *, n_ctx: int | None = None,
            prefill: bool | None = None) -> Tensor:
    """Run S sequences for L tokens each and return the logits at `last` [S]: [S, V] (fp32).

    tokens: [S, L]; slots: [S] cache rows; starts: [S] position of tokens[:, 0];
    lengths: [S] sequence length after this call (decode: attention covers positions < length).
    Prefill calls have starts == 0 and right padding (pad positions are written to the cache but
    never attended to: decode masks by length and later tokens overwrite them).

    n_ctx: max(lengths), given by callers that know it on the host (the engine): otherwise it is
    read from the device once per call (a sync on CUDA), never per layer.
    prefill: None = L > 1. Say True for one-token prompts: a decode call reads cache rows 0..S-1,
    a prefill call writes rows `slots`, which start after the running sequences.
    """
    S, L = tokens.shape
    positions = starts[:, None] + torch.arange(L, device=tokens.device)[None, :]  # [S, L]
    cos, sin = _rope_tables(w, positions)
    mask = None
    if not (L > 1 if prefill is None else prefill):
        if n_ctx is None:
            n_ctx = int(lengths.max())  # the one device -> host read of a call without n_ctx
        mask = torch.arange(n_ctx, device=tokens.device) < lengths[:, None]  # [S, n_ctx]
        mask = mask[:, None, None, :]  # [S, 1, 1, n_ctx]: broadcast over heads and the query
    x = F.embedding(tokens, w.embed)  # [S, L, E]
    eps = w.spec.rms_eps
    for i, lw in enumerate(w.layers):
        x = x + _attention(w, lw, i, _rms_norm(x, lw.ln1, eps), cos, sin, cache, slots, starts, mask, lora)
        x = x + _mlp(w, lw, i, _rms_norm(x, lw.ln2, eps), lora)
    h = x[torch.arange(S, device=x.device), last]  # [S, E]: only the rows we sample from
    return F.linear(_rms_norm(h, w.norm, eps), w.lm_head).float()
