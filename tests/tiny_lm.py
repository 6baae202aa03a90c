"""Small random-weight transformers models saved to a local folder (no hub): a GPT-2 (or
Llama / GPT-NeoX) architecture with the packaged MiniLM's tokenizer, for fast tests."""

from __future__ import annotations

from pathlib import Path

from switchsae.data.models import load_tokenizer

WIDTH, LAYERS = 32, 2


def save_tiny_lm(path, arch: str = "gpt2", seed: int = 0) -> Path:
    """A causal LM of width 32 and 2 blocks saved to `path` with a fast tokenizer."""
    import torch
    import transformers as T

    tok = load_tokenizer()  # MiniLM's WordPiece: a fast tokenizer, [CLS]/[SEP] special tokens
    vocab = len(tok)
    ids = {"bos_token_id": tok.cls_token_id, "eos_token_id": tok.sep_token_id, "pad_token_id": tok.pad_token_id}
    configs = {
        "gpt2": lambda: T.GPT2Config(vocab_size=vocab, n_embd=WIDTH, n_layer=LAYERS, n_head=2, n_positions=256, **ids),
        "llama": lambda: T.LlamaConfig(vocab_size=vocab, hidden_size=WIDTH, intermediate_size=64,
                                       num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=2,
                                       max_position_embeddings=256, **ids),
        "gpt_neox": lambda: T.GPTNeoXConfig(vocab_size=vocab, hidden_size=WIDTH, intermediate_size=64,
                                            num_hidden_layers=LAYERS, num_attention_heads=2,
                                            max_position_embeddings=256, **ids),
    }
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(configs[arch]())
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
