import pytest
import torch

from sdpo_fast.testing import tiny_causal_lm, tiny_tokenizer


@pytest.mark.parametrize("kind", ["qwen3", "plain", "none"])
def test_tiny_tokenizer_round_trips_and_is_fresh(kind):
    tok = tiny_tokenizer(kind)
    text = "Ünïcödé 🙂 text\n  with spaces and code: def f(x): return x"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert 300 <= len(tok) <= 1100
    tok.chat_template = "broken"
    tok.add_tokens(["<extra>"])
    again = tiny_tokenizer(kind)
    assert again.chat_template != "broken" and len(again) == len(tok) - 1


def test_tiny_tokenizer_special_tokens():
    qwen = tiny_tokenizer("qwen3")
    assert qwen.eos_token == "<|im_end|>" and qwen.bos_token is None
    for token in ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]:
        assert qwen(token, add_special_tokens=False)["input_ids"] == [qwen.convert_tokens_to_ids(token)]
    assert "enable_thinking" in qwen.chat_template
    assert tiny_tokenizer("none").chat_template is None
    with pytest.raises(ValueError, match="kind"):
        tiny_tokenizer("gpt2")


@pytest.mark.parametrize("arch,cls", [("qwen3", "Qwen3ForCausalLM"), ("llama", "LlamaForCausalLM"), ("olmo2", "Olmo2ForCausalLM")])
def test_tiny_causal_lm_is_seeded_fp32_eval(arch, cls):
    state = torch.random.get_rng_state()
    a, b, c = tiny_causal_lm(arch), tiny_causal_lm(arch), tiny_causal_lm(arch, seed=1)
    assert torch.equal(state, torch.random.get_rng_state())
    assert type(a).__name__ == cls and not a.training and a.dtype == torch.float32
    assert a.config.num_attention_heads == 4 and a.config.num_key_value_heads == 2
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    logits = a(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, len(tiny_tokenizer("qwen3")))


def test_tiny_causal_lm_tied_embeddings_and_overrides():
    m = tiny_causal_lm("llama", vocab_size=100, hidden_size=32, num_layers=1, tie_word_embeddings=True, rms_norm_eps=1e-5)
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    assert m.config.vocab_size == 100 and m.config.num_hidden_layers == 1 and m.config.rms_norm_eps == 1e-5
    with pytest.raises(ValueError, match="arch"):
        tiny_causal_lm("gpt2")
