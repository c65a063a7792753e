"""The models of fimlora: a from-scratch BERT and LLaMA with HF names, loaders and tokenizers.

    model, tok = load_model("minilm", num_labels=2, generator=g)   # BertForSequenceClassification
    model, tok = load_model("smollm2")                            # LlamaForCausalLM, BPETokenizer

Leaf to root: encoder.py (BERT), tokenizer.py (WordPiece), gguf.py (GGUF reader), checkpoint.py
(the checks every loader shares, BERT folders, model names), bpe.py (byte-level BPE), llama.py
(the decoder and its GGUF / HF-folder loaders).
"""

import torch
import torch.nn as nn

from models.bpe import BPETokenizer, tiny_bpe
from models.checkpoint import (DECODERS, is_decoder, load_pretrained, model_path,  # noqa: F401
                               smollm2_path)
from models.encoder import TINY, BertConfig, BertForSequenceClassification, BertModel  # noqa: F401
from models.llama import TINY_LLAMA, LlamaForCausalLM, llama_from_gguf, llama_from_hf
from models.tokenizer import WordPieceTokenizer, tiny_vocab


def load_model(name_or_path: str, num_labels: int | None = None,
               generator: torch.Generator | None = None,
               ) -> tuple[nn.Module, WordPieceTokenizer | BPETokenizer]:
    """A model name or folder -> (model, tokenizer): "tiny", "minilm" or an HF BERT folder (a
    BertModel, or BertForSequenceClassification given num_labels); decoders (num_labels
    ignored) "tiny-llama", "smollm2" (SmolLM2-135M-Instruct dequantised from its GGUF) or an HF
    llama / mistral / qwen2 folder. Random init (tiny models, fresh heads) draws from
    `generator`."""
    if name_or_path == "tiny-llama":
        return LlamaForCausalLM(TINY_LLAMA, generator), tiny_bpe()
    if name_or_path == "smollm2":
        return llama_from_gguf(smollm2_path())
    if name_or_path == "tiny":
        model = (BertModel(TINY, generator) if num_labels is None
                 else BertForSequenceClassification(TINY, num_labels, generator))
        return model, WordPieceTokenizer(tiny_vocab())
    folder = model_path(name_or_path)
    try:
        return (llama_from_hf(folder) if is_decoder(name_or_path) else
                load_pretrained(folder, num_labels, generator))
    except FileNotFoundError as e:  # a file the folder lacks: say what a folder holds
        raise FileNotFoundError(f"{e}: an HF model folder holds config.json, the weights and the "
                                "tokenizer (vocab.txt for BERT, else tokenizer.json), as "
                                "save_pretrained of the model and its tokenizer writes them"
                                ) from None
