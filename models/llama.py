"""A LLaMA-style decoder with Hugging Face's module names, and its GGUF / HF-folder loaders.

    model = LlamaForCausalLM(TINY_LLAMA, generator=torch.Generator())
    logits = model(input_ids, attention_mask)                        # (B, T, vocab)
    model, tok = llama_from_hf("folder")  # an HF llama / mistral / qwen2 folder (safetensors)

One pre-norm block, RMSNorm(x) = x / √(mean(x²) + ε) · w:
    h = x + W_o · Attn(RoPE(W_q n), RoPE(W_k n), W_v n),   n = RMSNorm(x)
    y = h + W_down · (SiLU(W_gate m) ⊙ W_up m),            m = RMSNorm(h)
Attn is causal, grouped-query, optionally within a sliding window (Mistral); Qwen2 adds q/k/v
biases. References: LLaMA arXiv:2302.13971, RoPE arXiv:2104.09864, GQA arXiv:2305.13245.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.bpe import BPETokenizer
from models.checkpoint import (HF_FAMILIES, REQUIRED, field, make_config, meta_model, only,
                               read_json, read_weights, shapes)
from models.encoder import init_weights
from models.gguf import read_gguf, read_gguf_header


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 49152  # the defaults are SmolLM2-135M's
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    head_dim: int = 0  # 0: hidden_size // num_attention_heads (HF configs may set another)
    qkv_bias: bool = False  # q/k/v_proj biases (qwen2; llama's attention_bias)
    o_bias: bool = False  # o_proj bias (llama's attention_bias)
    sliding_window: int | None = None  # a query sees the last `sliding_window` keys (mistral)

    def __post_init__(self):  # types and ranges are checked where a file is read
        if not self.head_dim:  # frozen: set the derived default once, here
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size={self.hidden_size} does not split into "
                                 f"num_attention_heads={self.num_attention_heads} heads")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even (RoPE rotates pairs)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads={self.num_key_value_heads}")


# 2 layers of width 64, 4 query heads sharing 2 key/value heads: a 16x32 step takes milliseconds
TINY_LLAMA = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, rope_theta=10000.0)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32 at least, then cast back before the weight, as transformers does
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, (B, T, head_dim), each half repeated (rotate-half form).
    rope_cos_sin(torch.arange(4)[None], 8, 1e4, torch.float32)[0].shape -> (1, 4, 8)"""
    wide = torch.promote_types(dtype, torch.float32)
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64,
                                            device=position_ids.device) / head_dim)
    angles = position_ids.to(wide)[..., None] * inv_freq.to(wide)  # (B, T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        d, f, hd, bias = (config.hidden_size, config.intermediate_size, config.head_dim,
                          config.qkv_bias)
        self.n_head, self.n_kv, self.head_dim = (config.num_attention_heads,
                                                 config.num_key_value_heads, hd)
        self.self_attn = nn.ModuleDict({  # HF's LlamaAttention
            "q_proj": nn.Linear(d, self.n_head * hd, bias=bias),
            "k_proj": nn.Linear(d, self.n_kv * hd, bias=bias),
            "v_proj": nn.Linear(d, self.n_kv * hd, bias=bias),
            "o_proj": nn.Linear(self.n_head * hd, d, bias=config.o_bias)})
        self.mlp = nn.ModuleDict({"gate_proj": nn.Linear(d, f, bias=False),  # HF's LlamaMLP
                                  "up_proj": nn.Linear(d, f, bias=False),
                                  "down_proj": nn.Linear(f, d, bias=False)})
        self.input_layernorm = RMSNorm(d, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(d, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        (B, T, _), a, n = x.shape, self.self_attn, self.input_layernorm(x)
        q = a.q_proj(n).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k, v = (p(n).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
                for p in (a.k_proj, a.v_proj))
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv != self.n_head)
        h = x + a.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        m, mlp = self.post_attention_layernorm(h), self.mlp
        return h + mlp.down_proj(F.silu(mlp.gate_proj(m)) * mlp.up_proj(m))


def causal_mask(attention_mask: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """(B, T) 1/0 padding mask -> (B, 1, T, T) "may attend": causal, not padding, keys k > q -
    window; a padding query sees itself, so its softmax stays finite (its output is unused).
    causal_mask(torch.tensor([[0, 1]]))[0, 0] -> [[True, False], [False, True]]"""
    T = attention_mask.shape[-1]
    keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T) keys
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    if window is not None:
        causal = causal.triu(1 - window)
    eye = torch.eye(T, dtype=torch.bool, device=attention_mask.device)
    return (causal & keep) | eye


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        layers = (LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.model = nn.ModuleDict({  # HF's LlamaModel: model.embed_tokens, model.layers.N, ...
            "embed_tokens": nn.Embedding(config.vocab_size, config.hidden_size),
            "layers": nn.ModuleList(layers), "norm": RMSNorm(config.hidden_size,
                                                             config.rms_norm_eps)})
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        init_weights(self, config.initializer_range, generator)
        self.tie_weights()

    def tie_weights(self) -> None:
        """With tie_word_embeddings, lm_head shares the embedding matrix (one Parameter)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T), optional 1/0 attention_mask (B, T) -> logits (B, T, vocab). With
        a mask, positions count real tokens only: a left-padded row gets the unpadded angles."""
        x = self.model.embed_tokens(input_ids)  # (B, T, d)
        T, window = input_ids.shape[1], self.config.sliding_window
        window = window if window is not None and window < T else None  # else: sees every key
        if attention_mask is None and window is None:
            positions, mask = torch.arange(T, device=input_ids.device)[None], None
        else:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            mask = causal_mask(attention_mask, window)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask)
        return self.lm_head(self.model.norm(x))


# -----------------------------------------------------------------------------
# loaders: the config and every tensor shape are checked before any real tensor is made


def _meta_model(config: LlamaConfig, found: dict[str, tuple], tokenizer: BPETokenizer,
                where: str, count: str) -> LlamaForCausalLM:
    """meta_model of `config`, after the tokenizer's size was checked against it."""
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"{where}: the tokenizer has {len(tokenizer)} tokens but vocab_size="
                         f"{config.vocab_size}: tokenizer and weights do not belong together")
    fresh = ("lm_head.",) if config.tie_word_embeddings else ()  # tied: no tensor of its own
    return meta_model(lambda: LlamaForCausalLM(config), found, config.num_hidden_layers,
                      "model.layers.", count, where, fresh)


def _assign(model: LlamaForCausalLM, sd: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    """The meta model holding the tensors `sd`; a tied head then takes the embedding matrix."""
    model.load_state_dict(sd, assign=True, strict=not model.config.tie_word_embeddings)
    model.tie_weights()
    return model.eval()


# GGUF (llama.cpp) tensor names -> ours
_GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GGUF_BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
               "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_GGUF_SIZES = {"hidden_size": "embedding_length", "intermediate_size": "feed_forward_length",
               "num_hidden_layers": "block_count", "num_attention_heads": "attention.head_count",
               "max_position_embeddings": "context_length"}


def gguf_name(name: str) -> str:
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight; unknown names stay."""
    parts = name.split(".")
    if len(parts) == 2 and parts[0] in _GGUF_TOP:
        return f"{_GGUF_TOP[parts[0]]}.{parts[1]}"
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_BLOCK:
        return f"model.layers.{parts[1]}.{_GGUF_BLOCK[parts[2]]}.{parts[3]}"
    return name


def config_from_gguf(meta: dict, tensor_names, where: str = "GGUF") -> LlamaConfig:
    """LlamaConfig from `llama.*` metadata, every value by type and range."""
    if meta.get("general.architecture") != "llama":
        raise ValueError(f"{where}: general.architecture={meta.get('general.architecture')!r}: "
                         "this loader reads 'llama' models only")
    if meta.get("llama.rope.scaling.type", "none") != "none":
        raise ValueError(f"{where}: llama.rope.scaling.type={meta['llama.rope.scaling.type']!r} "
                         "is not supported (plain RoPE only)")
    kw = {name: field(meta, f"llama.{key}", "size", where) for name, key in _GGUF_SIZES.items()}
    kw["num_key_value_heads"] = field(meta, "llama.attention.head_count_kv", "size", where,
                                      kw["num_attention_heads"])
    kw["rms_norm_eps"] = field(meta, "llama.attention.layer_norm_rms_epsilon", "positive", where,
                               1e-5)
    kw["rope_theta"] = field(meta, "llama.rope.freq_base", "positive", where, 10000.0)
    tokens = meta.get("tokenizer.ggml.tokens")
    kw["vocab_size"] = field(meta, "llama.vocab_size", "size", where,
                             len(tokens) if isinstance(tokens, list) else REQUIRED)
    config = make_config(LlamaConfig, where, **kw,
                         tie_word_embeddings="output.weight" not in tensor_names)
    if field(meta, "llama.rope.dimension_count", "size", where, config.head_dim) != \
            config.head_dim:
        raise ValueError(f"{where}: llama.rope.dimension_count != head_dim={config.head_dim}: "
                         "partial rotary embeddings are not supported")
    return config


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute`, which reorders each head's
    rows from rotate-half order (i, i + d/2) to GGML's interleaved pairs (2i, 2i + 1):
    gguf = w.reshape(n_head, 2, hd/2, d_in).swapaxes(1, 2).reshape(w.shape)."""
    d_out, d_in = w.shape
    return w.reshape(n_head, d_out // n_head // 2, 2, d_in).transpose(1, 2).reshape(d_out, d_in)


def llama_from_gguf(path: str | os.PathLike) -> tuple[LlamaForCausalLM, BPETokenizer]:
    """A llama GGUF file -> (float32 LlamaForCausalLM in eval mode, its BPE tokenizer)."""
    header = read_gguf_header(path)
    config = config_from_gguf(header.metadata, header.tensors, str(path))
    tokenizer = BPETokenizer.from_gguf(header.metadata, str(path))
    found = {gguf_name(n): info.shape for n, info in header.tensors.items()}
    model = _meta_model(config, found, tokenizer, str(path), f"{path}: llama.block_count")
    sd = {gguf_name(n): t for n, t in read_gguf(path)[1].items()}
    for i in range(config.num_hidden_layers):
        q, k = (f"model.layers.{i}.self_attn.{m}_proj.weight" for m in "qk")
        sd[q] = unpermute_qk(sd[q], config.num_attention_heads)
        sd[k] = unpermute_qk(sd[k], config.num_key_value_heads)
    return _assign(model, sd), tokenizer


# Hugging Face folders: config.json, model.safetensors, tokenizer.json


def _rope_theta(raw: dict, where: str) -> float:
    """rope_theta of plain RoPE from transformers 5's rope_parameters or 4's rope_scaling."""
    params = raw.get("rope_parameters") or {}
    for name, d in (("rope_parameters", params), ("rope_scaling", raw.get("rope_scaling") or {})):
        kind = d.get("rope_type", d.get("type", "default")) if isinstance(d, dict) else d
        if kind != "default" or d.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"{where}: {name} rope_type={kind!r} is not supported (plain, full "
                             "RoPE only)")
    return field({**raw, **params}, "rope_theta", "positive", where, 10000.0)


def config_from_hf(raw: dict, where: str = "config.json") -> LlamaConfig:
    """LlamaConfig from an HF llama / mistral / qwen2 config.json, every field by type and
    range, with transformers' defaults; what this decoder does not compute is refused by name."""
    family = raw.get("model_type")
    if family not in HF_FAMILIES:
        raise ValueError(f"{where}: model_type={family!r} is not a decoder this loader reads "
                         f"(one of {HF_FAMILIES})")
    only(raw, {"hidden_act": "silu", "mlp_bias": False, "attention_dropout": 0.0,
               "use_sliding_window": False}, where)
    layer_types = raw.get("layer_types") or []
    if not isinstance(layer_types, list) or any(t != "full_attention" for t in layer_types):
        raise ValueError(f"{where}: layer_types={str(layer_types)[:100]} is not supported "
                         "(full_attention layers only)")
    kw = {k: field(raw, k, "size", where) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "max_position_embeddings")}
    kw["num_key_value_heads"] = field(raw, "num_key_value_heads", "size", where,
                                      kw["num_attention_heads"])
    kw["rms_norm_eps"] = field(raw, "rms_norm_eps", "positive", where, 1e-6)
    kw["rope_theta"] = _rope_theta(raw, where)
    kw["tie_word_embeddings"] = field(raw, "tie_word_embeddings", "bool", where, False)
    kw["head_dim"] = field(raw, "head_dim", "size?", where, None) or 0
    bias = family == "qwen2" or field(raw, "attention_bias", "bool", where, False)
    kw["qkv_bias"], kw["o_bias"] = bias, bias and family != "qwen2"
    if family == "mistral":
        kw["sliding_window"] = field(raw, "sliding_window", "size?", where, None)
    return make_config(LlamaConfig, where, **kw)


def llama_from_hf(path: str | os.PathLike) -> tuple[LlamaForCausalLM, BPETokenizer]:
    """An HF llama / mistral / qwen2 folder -> (float32 LlamaForCausalLM in eval mode, BPE)."""
    folder = Path(path)
    where = str(folder / "config.json")
    config = config_from_hf(read_json(folder / "config.json"), where)
    tokenizer = BPETokenizer.from_hf_folder(folder)
    sd = {k: v for k, v in read_weights(folder).items()
          if not k.endswith("rotary_emb.inv_freq")}  # a buffer old LLaMA checkpoints saved
    if config.tie_word_embeddings:
        head, embed = sd.pop("lm_head.weight", None), sd.get("model.embed_tokens.weight")
        if head is not None and (embed is None or not torch.equal(head, embed)):
            raise ValueError(f"{folder}: config.json ties the head to the embeddings, but the "
                             "weights hold a different lm_head.weight: set tie_word_embeddings "
                             "to false")
    model = _meta_model(config, shapes(sd), tokenizer, str(folder), f"{where}: num_hidden_layers")
    return _assign(model, {k: v.float() for k, v in sd.items()}), tokenizer
