"""The models of fimlora: a from-scratch BERT and LLaMA with HF names, loaders and tokenizers."""

from models.bpe import BPETokenizer, tiny_bpe
from models.checkpoint import (DECODERS, LoadInfo, build_model, is_decoder, load_model,
                               load_pretrained, load_tokenizer, model_path)
from models.encoder import TINY, BertConfig, BertForSequenceClassification, BertModel, init_weights
from models.llama import (TINY_LLAMA, LlamaConfig, LlamaForCausalLM, llama_from_gguf,
                          llama_from_hf, load_smollm2)
from models.tokenizer import WordPieceTokenizer, tiny_vocab

__all__ = ["BPETokenizer", "BertConfig", "BertForSequenceClassification", "BertModel", "DECODERS",
           "LlamaConfig", "LlamaForCausalLM", "LoadInfo", "TINY", "TINY_LLAMA",
           "WordPieceTokenizer", "build_model", "init_weights", "is_decoder", "llama_from_gguf",
           "llama_from_hf", "load_model",
           "load_pretrained", "load_smollm2", "load_tokenizer", "model_path", "tiny_bpe",
           "tiny_vocab"]
