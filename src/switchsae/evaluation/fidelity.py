"""Downstream fidelity: splice an SAE's reconstruction into a transformers model and measure
how much the model's output moves.

At `layer` (the numbering of `switchsae.data.harvest`: 0 = embedding output, i = output of
block i), a hook replaces the hidden states of the non-padding tokens by the SAE's x_hat.
For a sentence-embedding model such as MiniLM the output is the mean-pooled last hidden state
(mean over non-padding tokens, as sentence-transformers pools), and per text

    cos_sae     = cos(embedding, embedding with x_hat spliced in)
    cos_ablated = cos(embedding, embedding with the layer ablated)   (the floor)
    fraction_recovered = (cos_sae - cos_ablated) / (1 - cos_ablated)

with the cosines averaged over texts first: 1 = the SAE loses nothing, 0 = as bad as removing
the layer's information.  Ablation "zero" writes zeros; "mean" writes the mean activation over
every spliced token of the texts (a gentler floor: it keeps the average, removes the
token-specific information).  This is the sentence-embedding analogue of SAELens's "CE loss
recovered" for language models.  Works with any `AutoModel` whose blocks form a ModuleList of
`num_hidden_layers` modules taking the hidden states first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

from switchsae.data.harvest import DEFAULT_LAYER, default_texts
from switchsae.data.models import load_model, tokenize, transformer_blocks

ABLATIONS = ("zero", "mean")


class FidelityError(ValueError):
    """Bad arguments to the fidelity evaluation (layer, ablation, texts, model)."""


@dataclass(frozen=True)
class Fidelity:
    """cos_sae, cos_ablated: mean over texts of the cosine between the clean output embedding
    and the spliced / ablated one; fraction_recovered: see the module docstring (NaN when the
    ablation does not change the output).  layer_fvu: FVU of the reconstruction over the
    spliced tokens.  n_texts, n_tokens: texts evaluated and tokens spliced."""

    cos_sae: float
    cos_ablated: float
    fraction_recovered: float
    layer_fvu: float
    n_texts: int
    n_tokens: int
    layer: int
    ablation: str

    def summary(self) -> dict:
        return asdict(self)


def splice_fidelity(reconstruct, texts: Sequence[str] | None = None, layer: int = DEFAULT_LAYER,
                    model=None, *, ablation: str = "zero", batch_size: int = 16,
                    max_length: int = 128, max_texts: int | None = None,
                    skip_special_tokens: bool = False, device: str | None = None) -> Fidelity:
    """Fidelity of `reconstruct` spliced in at `layer` of `model` over `texts` (default:
    `switchsae.data.default_texts()`, of which the first `max_texts`).

    reconstruct: a `SwitchSAE` (its x_hat is used) or a callable mapping a float32
        (n_tokens, d_model) NumPy array to an array of the same shape.
    model: a local transformers model directory (default: MiniLM-L6), or a
        (tokenizer, model) pair from `load_model` to reuse across calls.
    ablation: "zero" or "mean", the floor (see the module docstring).
    skip_special_tokens: leave [CLS]/[SEP]-like tokens unspliced (match how the SAE's
        training activations were harvested).
    device: where a model loaded from a path runs (None: CUDA when present; a given pair
        stays where it is)."""
    if ablation not in ABLATIONS:
        raise FidelityError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
    if batch_size < 1:
        raise FidelityError(f"batch_size must be >= 1, got {batch_size}")
    texts = list(default_texts() if texts is None else texts)[:max_texts]
    if not texts or not all(isinstance(t, str) for t in texts):
        raise FidelityError("texts must be a non-empty sequence of strings")
    fn = _as_function(reconstruct)
    tok, model = model if isinstance(model, tuple) else load_model(model, device)
    import torch

    encodings = [_encode(tok, texts[i:i + batch_size], max_length, skip_special_tokens, model.device)
                 for i in range(0, len(texts), batch_size)]
    splice = LayerSplice(model, layer)
    try:
        with torch.no_grad():
            clean, stats = [], _Moments()
            for enc, keep in encodings:
                clean.append(_pooled(model, enc, splice, keep, None))
                stats.add(splice.seen)
            if stats.n == 0:
                raise FidelityError("no tokens to splice (every token is padding or special)")
            floor = _zeros if ablation == "zero" else _constant(stats.mean())
            cos_sae, cos_ablated, err = [], [], 0.0
            for (enc, keep), ref in zip(encodings, clean):
                cos_sae.append(_cosine(ref, _pooled(model, enc, splice, keep, fn)))
                err += float(np.sum((splice.seen.astype(np.float64) - splice.written) ** 2))
                cos_ablated.append(_cosine(ref, _pooled(model, enc, splice, keep, floor)))
    finally:
        splice.remove()
    c_sae, c_abl = float(np.mean(np.concatenate(cos_sae))), float(np.mean(np.concatenate(cos_ablated)))
    gap = 1.0 - c_abl
    return Fidelity(
        cos_sae=c_sae, cos_ablated=c_abl,
        fraction_recovered=(c_sae - c_abl) / gap if gap > 1e-12 else float("nan"),
        layer_fvu=err / stats.total_variance(), n_texts=len(texts), n_tokens=stats.n,
        layer=splice.layer, ablation=ablation,
    )


class LayerSplice:
    """A hook at hidden_states[layer] of `model`: while `fn` is set, the rows selected by the
    (batch, seq) bool mask `keep` are replaced by fn(those rows) (NumPy float32 in and out).
    After each forward, `seen` holds the rows that arrived and `written` what replaced them.
    Layers below num_hidden_layers hook the input of block `layer`, the last one the output
    of the last block; negative layers count from the end.  Call `remove()` when done."""

    def __init__(self, model, layer: int):

        n = model.config.get_text_config().num_hidden_layers
        if not -(n + 1) <= layer <= n:
            raise FidelityError(f"layer {layer} out of range for a model with {n} layers "
                                f"(valid: 0 = embeddings .. {n}, or negative)")
        self.layer = layer % (n + 1)
        blocks = transformer_blocks(model)
        if blocks is None:
            raise FidelityError(f"cannot find the {n} transformer blocks (a ModuleList) of {type(model).__name__}")
        self.fn: Callable | None = None
        self.keep = self.seen = self.written = None
        if self.layer < n:
            self._handle = blocks[self.layer].register_forward_pre_hook(self._before, with_kwargs=True)
        else:
            self._handle = blocks[n - 1].register_forward_hook(self._after)

    def remove(self) -> None:
        self._handle.remove()

    def _swap(self, hidden):
        import torch

        rows = hidden[self.keep.to(hidden.device)]
        self.seen = rows.float().cpu().numpy()
        if self.fn is None:
            self.written = None
            return hidden
        self.written = np.array(self.fn(self.seen), dtype=np.float32)  # a writable copy
        if self.written.shape != self.seen.shape:
            raise FidelityError(f"reconstruction has shape {self.written.shape}, expected {self.seen.shape}")
        out = hidden.clone()
        out[self.keep.to(hidden.device)] = torch.as_tensor(self.written, dtype=hidden.dtype, device=hidden.device)
        return out

    def _before(self, _module, args, kwargs):
        if args:
            return (self._swap(args[0]), *args[1:]), kwargs
        return args, dict(kwargs, hidden_states=self._swap(kwargs["hidden_states"]))

    def _after(self, _module, _args, output):
        if isinstance(output, tuple):
            return (self._swap(output[0]), *output[1:])
        return self._swap(output)


def _as_function(reconstruct) -> Callable[[np.ndarray], np.ndarray]:
    from switchsae.model import SwitchSAE

    if isinstance(reconstruct, SwitchSAE):
        sae = reconstruct
        return lambda x: sae.backend.to_numpy(sae.forward(x).x_hat)
    if not callable(reconstruct):
        raise FidelityError(f"reconstruct must be a SwitchSAE or a callable, got {type(reconstruct).__name__}")
    return reconstruct


def _encode(tok, batch, max_length, skip_special_tokens, device):
    """-> (model inputs on device, (batch, seq) bool mask of the tokens to splice)."""
    enc, _ = tokenize(tok, batch, max_length, padding=True, return_tensors="pt",
                      return_special_tokens_mask=skip_special_tokens)
    keep = enc["attention_mask"].bool()
    if skip_special_tokens:
        keep &= ~enc.pop("special_tokens_mask").bool()
    return enc.to(device), keep


def _pooled(model, enc, splice, keep, fn) -> np.ndarray:
    """Mean-pooled last hidden state (batch, d_model), float64, with `fn` spliced in."""
    splice.fn, splice.keep = fn, keep
    hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].to(hidden.dtype)[..., None]
    return ((hidden * mask).sum(1) / mask.sum(1)).double().cpu().numpy()


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of (batch, d) arrays; 0 against a zero vector."""
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.sum(a * b, axis=-1) / np.maximum(norms, 1e-300)


def _zeros(x: np.ndarray) -> np.ndarray:
    return np.zeros_like(x)


def _constant(mean: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    row = mean.astype(np.float32)
    return lambda x: np.broadcast_to(row, x.shape)


class _Moments:
    """Running count, sum and sum of squares of activation rows (float64)."""

    def __init__(self):
        self.n, self.sum, self.sq = 0, 0.0, 0.0

    def add(self, rows: np.ndarray) -> None:
        rows = rows.astype(np.float64)
        self.n += rows.shape[0]
        self.sum = self.sum + rows.sum(axis=0)
        self.sq += float(np.sum(rows * rows))

    def mean(self) -> np.ndarray:
        return self.sum / self.n

    def total_variance(self) -> float:
        """sum over rows of ||x - mean||^2."""
        return self.sq - self.n * float(np.sum(self.mean() ** 2))
