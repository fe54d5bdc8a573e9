"""Offline builders for tests: tiny BPE tokenizers with chat templates and tiny random causal LMs.

Nothing here touches the network; every builder is deterministic.
"""
from __future__ import annotations

import functools

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

_CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "Please write a short email to my manager asking for a day off next Friday.",
    "Can you explain how photosynthesis works in simple terms?",
    "That is not correct, the capital of Australia is Canberra, not Sydney.",
    "Please answer in a bulleted list instead of a long paragraph.",
    "Make it more formal and remove the emojis.",
    "Thanks! Now, what is a good recipe for a vegetarian lasagna?",
    "Here is a Python function that returns the sum of a list of numbers.",
    "def add(a, b):\n    return a + b\n",
    "You forgot to handle the empty list case; the code raises an error.",
    "The following is a future user message. Use this to guide your answer to the user prompt:",
    "Sure! Here are three ideas for a birthday party: a picnic, a movie night, and a board game evening.",
    "I asked for a summary in two sentences, not five paragraphs.",
    "Could you translate this sentence into French and German?",
    "The meeting is scheduled for 10:30 on Monday, 3 March 2025.",
    "Water boils at 100 degrees Celsius at sea level.",
    "Write it like a pirate would say it, with lots of arrr.",
    "Let's change the topic: what are the best hiking trails near Zurich?",
    "You are a helpful assistant. Answer concisely and accurately.",
    "I'm sorry, but I can't help with that request.",
    "Step 1: preheat the oven. Step 2: mix the flour and the eggs. Step 3: bake for 20 minutes.",
    "Hey! Quick question: just wondering if the report is ready?",
    "Dear Ms. Smith, I am writing to kindly request an update on the quarterly report.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2048 3.14",
    "Use JSON: {\"name\": \"Ada\", \"age\": 36, \"skills\": [\"math\", \"poetry\"]}",
    "Ünïcödé têxt, emojis 🙂 and symbols like € and ß should round-trip.",
)

_QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

_PLAIN_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

# kind -> (special tokens, non-special added tokens, tokenizer kwargs, chat template)
_KINDS = {
    "qwen3": (
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        ("<think>", "</think>"),
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        _QWEN3_TEMPLATE,
    ),
    "plain": (
        ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        (),
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<|end_of_text|>"},
        _PLAIN_TEMPLATE,
    ),
    "none": (
        ("<|endoftext|>",),
        (),
        {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
        None,
    ),
}

_VOCAB_SIZE = 768


@functools.lru_cache(maxsize=None)
def _trained_tokenizer_json(kind: str) -> str:
    special, added, kwargs, _ = _KINDS[kind]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=list(special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    if added:
        tok.add_tokens(list(added))
    if "bos_token" in kwargs:
        bos = kwargs["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return tok.to_str()


def tiny_tokenizer(kind: str = "qwen3") -> transformers.PreTrainedTokenizerFast:
    """A fresh byte-level BPE tokenizer (~770 ids) trained offline on a built-in English corpus.

    kind="qwen3": ChatML tokens `<|im_start|>`/`<|im_end|>`/`<|endoftext|>`, eos `<|im_end|>`, and a
    Qwen3-like template that inserts `<think>\\n\\n</think>\\n\\n` after the generation prompt when
    `enable_thinking=False`. kind="plain": Llama-3-like header tokens, bos `<|begin_of_text|>` (also
    added by the post-processor when `add_special_tokens=True`), end of turn `<|eot_id|>`, eos
    `<|end_of_text|>`. kind="none": no chat template. Each call returns a new object.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {sorted(_KINDS)}, got {kind!r}")
    _, _, kwargs, template = _KINDS[kind]
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(kind)),
        chat_template=template,
        **kwargs,
    )


_ARCHS = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"),
}


def tiny_causal_lm(
    arch: str = "qwen3",
    vocab_size: int | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    **overrides,
) -> "transformers.PreTrainedModel":
    """A random-initialized fp32 model in eval mode: 4 query heads, 2 KV heads, head_dim hidden_size/4.

    arch in {"qwen3", "llama", "olmo2"}; vocab_size defaults to len(tiny_tokenizer("qwen3")).
    `overrides` are extra config fields. The global torch RNG state is left untouched.
    """
    if arch not in _ARCHS:
        raise ValueError(f"arch must be one of {sorted(_ARCHS)}, got {arch!r}")
    if hidden_size % 4:
        raise ValueError(f"hidden_size must be divisible by 4 (4 heads), got {hidden_size}")
    import torch

    config_cls, model_cls = (getattr(transformers, name) for name in _ARCHS[arch])
    fields = dict(
        vocab_size=vocab_size if vocab_size is not None else len(tiny_tokenizer("qwen3")),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=4096,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    fields.update(overrides)
    config = config_cls(**fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.to(torch.float32).eval()
