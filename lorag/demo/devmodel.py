"""Build a tiny Llama-shaped model locally (random LoRA adapters: tests/random_adapter.py).

No machine lorag is tested on can download weights, so the tests and the demo
build their own model. The shape is the smallest the vLLM CPU backend accepts
(head_dim 64: hidden 128, 2 heads, 1 KV head) so an engine starts in seconds.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>",
                  "<|tool|>", "<|end|>"]
TINY_CORPUS = """
The court held that the contract was void because consideration was missing.
A tenant may terminate the lease with thirty days written notice to the landlord.
The patient presented with fever, cough and shortness of breath for three days.
Take one tablet twice a day with food; do not exceed the stated dose.
The bond yield rose as the central bank raised interest rates by a quarter point.
Quarterly revenue grew twelve percent while operating margin fell slightly.
To reset your password open settings, choose security and follow the e-mail link.
Our support team answers tickets within one business day, every day of the week.
Hello! How can I help you today? Please tell me more about your question.
The quick brown fox jumps over the lazy dog near the river bank in the morning.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. JSON: {"answer": "yes", "score": 0.9}
""".strip()


def _train_tokenizer(vocab_size: int, corpus: str):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus.splitlines() * 4, trainer=trainer)
    return tokenizer


def build_tiny_model(
    path: str | Path,
    *,
    vocab_size: int = 512,
    hidden_size: int = 128,
    layers: int = 2,
    max_positions: int = 2048,
    seed: int = 0,
    corpus: str = TINY_CORPUS,
    init_std: float = 0.02,
) -> Path:
    """Write a randomly initialised Llama model and its tokenizer to `path` (idempotent).

    `corpus` trains the tokenizer (text it covers becomes whole-word tokens); a larger
    `init_std` gives the output head logits wide enough for a LoRA to make confident choices.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(path)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    raw = _train_tokenizer(vocab_size, corpus)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<s>",
        eos_token="<|end|>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = max_positions
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=hidden_size // 64,
        num_key_value_heads=1,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=init_std,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
