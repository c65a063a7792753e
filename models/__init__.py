"""The encoder side of fimlora: a from-scratch BERT with HF names, its loader and tokenizer."""

from models.checkpoint import (LoadInfo, build_model, load_model, load_pretrained, load_tokenizer,
                               model_path)
from models.encoder import TINY, BertConfig, BertForSequenceClassification, BertModel, init_weights
from models.tokenizer import WordPieceTokenizer, tiny_vocab

__all__ = ["BertConfig", "BertForSequenceClassification", "BertModel", "LoadInfo", "TINY",
           "WordPieceTokenizer", "build_model", "init_weights", "load_model", "load_pretrained",
           "load_tokenizer", "model_path", "tiny_vocab"]
