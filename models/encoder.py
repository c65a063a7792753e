"""A BERT-family encoder written from scratch, with Hugging Face's module names.

    model = BertForSequenceClassification(TINY, num_labels=2, generator=torch.Generator())
    logits = model(input_ids, attention_mask, token_type_ids)       # (B, num_labels)

One block is BERT's post-LN layer with exact (erf) GELU:
    h = LN(x + Drop(W_o · Attn(x)))          Attn = softmax(Q Kᵀ / √d_head + mask) V, per head
    y = LN(h + Drop(W_2 · GELU(W_1 h)))
Reference: BERT, Devlin et al. 2018, arXiv:1810.04805.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0
    initializer_range: float = 0.02
    classifier_dropout: float | None = None  # None: hidden_dropout_prob, as in transformers

    def __post_init__(self):  # types and ranges are checked where a file is read (checkpoint)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id={self.pad_token_id} is not in [0, {self.vocab_size})")


# 2 layers of width 64: a forward+backward of a 16x32 batch takes milliseconds on a CPU
TINY = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=128)


def init_weights(module: nn.Module, std: float = 0.02,
                 generator: torch.Generator | None = None) -> None:
    """BERT's (and LLaMA's) init: Linear and Embedding weights ~ N(0, std²) (a padding row
    zero), biases 0, norm weights (LayerNorm, RMSNorm) 1. Modules are visited in registration
    order, so one generator seed gives one model; generator=None draws from torch's global RNG."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std, generator=generator)
                if getattr(m, "padding_idx", None) is not None:
                    m.weight[m.padding_idx].zero_()
            elif isinstance(getattr(m, "weight", None), nn.Parameter):  # a norm layer
                m.weight.fill_(1.0)
            if isinstance(getattr(m, "bias", None), torch.Tensor):
                m.bias.zero_()


# -----------------------------------------------------------------------------
# blocks, leaf to root


def _add_norm(d_in: int, config: BertConfig) -> nn.ModuleDict:
    """HF's BertSelfOutput / BertOutput: LN(residual + Drop(W x)), written in BertLayer."""
    return nn.ModuleDict({"dense": nn.Linear(d_in, config.hidden_size),
                          "LayerNorm": nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
                          "dropout": nn.Dropout(config.hidden_dropout_prob)})


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        C, I = config.hidden_size, config.intermediate_size
        self.n_head = config.num_attention_heads
        self.dropout_p = config.attention_probs_dropout_prob
        # three Linears, not one fused qkv: LoRA targets and checkpoints name them separately
        qkv = nn.ModuleDict({name: nn.Linear(C, C) for name in ("query", "key", "value")})
        self.attention = nn.ModuleDict({"self": qkv, "output": _add_norm(C, config)})
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(C, I)})
        self.output = _add_norm(I, config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        (B, T, C), a, o = x.shape, self.attention["output"], self.output
        q, k, v = (lin(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for lin in self.attention["self"].values())  # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout_p if self.training else 0.0)
        h = a.LayerNorm(x + a.dropout(a.dense(y.transpose(1, 2).reshape(B, T, C))))
        return o.LayerNorm(h + o.dropout(o.dense(F.gelu(self.intermediate.dense(h)))))


# -----------------------------------------------------------------------------
# models


class BertModel(nn.Module):
    """Embeddings -> N post-LN blocks -> (last hidden states, tanh pooler on [CLS])."""

    def __init__(self, config: BertConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.config, C = config, config.hidden_size
        self.embeddings = nn.ModuleDict({  # HF's BertEmbeddings
            "word_embeddings": nn.Embedding(config.vocab_size, C, padding_idx=config.pad_token_id),
            "position_embeddings": nn.Embedding(config.max_position_embeddings, C),
            "token_type_embeddings": nn.Embedding(config.type_vocab_size, C),
            "LayerNorm": nn.LayerNorm(C, eps=config.layer_norm_eps),
            "dropout": nn.Dropout(config.hidden_dropout_prob)})
        layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.encoder = nn.ModuleDict({"layer": layers})  # HF's name: encoder.layer.N
        self.pooler = nn.ModuleDict({"dense": nn.Linear(C, C)})
        init_weights(self, config.initializer_range, generator)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask (1 = real token, 0 = padding), token_type_ids: (B, T).
        Padding keys are masked out of every query's softmax; a row with no real token
        gives NaN. Returns (last_hidden (B, T, C), pooled (B, C))."""
        T, max_T = input_ids.size(1), self.config.max_position_embeddings
        if T > max_T:
            raise ValueError(f"sequence length {T} > max_position_embeddings={max_T}: "
                             f"tokenize with max_len <= {max_T}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        # boolean (B, 1, 1, T), True = attend: broadcast over heads and queries, dtype-agnostic
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        e, positions = self.embeddings, torch.arange(T, device=input_ids.device)  # (T,)
        x = e.word_embeddings(input_ids) + e.token_type_embeddings(token_type_ids)
        x = e.dropout(e.LayerNorm(x + e.position_embeddings(positions)))  # (B, T, C)
        for layer in self.encoder["layer"]:
            x = layer(x, mask)
        return x, torch.tanh(self.pooler.dense(x[:, 0]))  # the pooler reads [CLS]


class BertForSequenceClassification(nn.Module):
    """logits = W_c · Drop(pooled) + b_c, (B, num_labels); num_labels = 1 means regression (STS-B).
    Submodules `bert`, `dropout`, `classifier` have transformers' names."""

    def __init__(self, config: BertConfig, num_labels: int,
                 generator: torch.Generator | None = None):
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels={num_labels}: use >= 1 (1 for regression)")
        self.config, self.num_labels = config, num_labels
        self.bert = BertModel(config, generator)
        p = config.classifier_dropout
        self.dropout = nn.Dropout(config.hidden_dropout_prob if p is None else p)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        init_weights(self.classifier, config.initializer_range, generator)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        _, pooled = self.bert(input_ids, attention_mask, token_type_ids)
        return self.classifier(self.dropout(pooled))
