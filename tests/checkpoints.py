"""Tiny Hugging Face checkpoints built on the fly: random weights from transformers, a byte-level
BPE tokenizer trained with `tokenizers`, ChatML special tokens and template. No network."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Real published tokenizer files and chat templates (no weights), in shared/ beside the clone.
REALWORLD = Path(__file__).resolve().parents[1].parent / "shared" / "realworld" / "tokenizers"

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CORPUS = [
    "Hello there! How are you doing today? I am fine, thank you.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "Transformers use attention: softmax(QK^T / sqrt(d)) V.",
    "你好，世界！今天天气很好。我们一起学习注意力机制。",
    "Emoji test 😀🎉🚀 and accents: café naïve résumé.",
    "def main():\n    print('hello world')\n    return 0\n",
]

FAMILIES = ("llama", "llama_tied_llama3_rope", "mistral", "qwen2", "qwen3", "gpt2", "gemma3")


GEMMA3_ATTN_SOFTCAP, GEMMA3_FINAL_SOFTCAP = 2.0, 4.0


def train_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer with ChatML specials (ids 0-2), like Qwen's and SmolLM's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    return tok


def hf_config(family: str, vocab_size: int, **overrides):
    import transformers as tf

    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=2, max_position_embeddings=256)
    llama_like = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.2, **common,
    )
    if family == "llama":
        cfg = tf.LlamaConfig(**llama_like, tie_word_embeddings=False)
    elif family == "llama_tied_llama3_rope":
        cfg = tf.LlamaConfig(
            **llama_like, tie_word_embeddings=True,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        )
    elif family == "llama_linear_rope":
        cfg = tf.LlamaConfig(**llama_like, rope_scaling={"rope_type": "linear", "factor": 2.0})
    elif family == "mistral":
        cfg = tf.MistralConfig(**llama_like, sliding_window=24)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**llama_like, tie_word_embeddings=True)
    elif family == "qwen3":
        cfg = tf.Qwen3Config(**llama_like, head_dim=24, tie_word_embeddings=False)
    elif family == "gemma3":
        # Local (sliding) and global layers alternate; the window (8) is shorter than the tests' sequences,
        # head_dim is not hidden // heads, sqrt(hidden) is no bfloat16 number (the embedding scale is rounded),
        # and the final soft-cap is low enough to change the logits.
        # attn_logit_softcapping is set too: transformers' Gemma 3 ignores it, so must we.
        cfg = tf.Gemma3TextConfig(
            **{**llama_like, "hidden_size": 48, "num_hidden_layers": 4}, head_dim=24,
            sliding_window=8, sliding_window_pattern=2,
            query_pre_attn_scalar=20, attn_logit_softcapping=GEMMA3_ATTN_SOFTCAP,
            final_logit_softcapping=GEMMA3_FINAL_SOFTCAP, rope_theta=5000.0, rope_local_base_freq=100.0,
        )
    elif family == "gpt2":
        cfg = tf.GPT2Config(
            vocab_size=vocab_size, n_positions=256, n_embd=64, n_layer=2, n_head=4,
            initializer_range=0.2, bos_token_id=0, eos_token_id=2,
        )
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def make_checkpoint(path: Path, family: str, tokenizer=None, seed: int = 0, **config_overrides) -> Path:
    """Save a random-weight HF model of the family plus tokenizer files into path."""
    import transformers as tf

    tokenizer = tokenizer or train_tokenizer()
    cfg = hf_config(family, tokenizer.get_vocab_size(), **config_overrides)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "chat_template": CHATML_TEMPLATE,
                "add_bos_token": False,
            }
        )
    )
    return path


# Parity tests run on the CPU, and on CUDA too where there is one.
DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


def hf_model(path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """transformers' model of the checkpoint with eager attention (the reference for attention weights too)."""
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").to(device).eval()


def hf_tokenizer(path: Path):
    import transformers as tf

    return tf.AutoTokenizer.from_pretrained(path)


def set_tensor(path: Path, key: str, value: float) -> Path:
    """Overwrite every element of one tensor in path/model.safetensors with value (e.g. 0 or NaN)."""
    from safetensors.torch import load_file, save_file

    weights = load_file(path / "model.safetensors")
    weights[key] = torch.full_like(weights[key], value)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def make_hostile_checkpoint(path: Path, reply_token: str) -> Path:
    """A model whose every greedy token decodes to reply_token (e.g. terminal escape sequences).

    Its tokenizer is a word-level vocabulary with reply_token as id 0, and its lm_head is zero, so all logits
    tie and argmax always picks id 0; the reply is reply_token repeated, joined by spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {reply_token: 0, "<unk>": 1, **{s: 2 + i for i, s in enumerate(specials)}, "user": 5, "assistant": 6}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(specials)
    make_checkpoint(path, "llama", tokenizer)
    return set_tensor(path, "lm_head.weight", 0.0)
