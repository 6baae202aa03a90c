"""The Switch SAE feature browser: a static site (HTML + JS + data, opens from file://).

    from switchsae.inspect import collect, build_site
    corpus = collect(texts=["Some text.", ...])       # activations + their tokens (MiniLM-L6)
    build_site(sae, corpus, "browser")                # browser/index.html, #<expert>/<feature>

`switchsae inspect CKPT` does the same for a checkpoint (see `switchsae.inspect.cli`).
"""

from .collect import Corpus, collect, load_tokenizer, token_strings
from .data import site_data
from .site import build_site, read_site_data, write_site

__all__ = ["Corpus", "build_site", "collect", "load_tokenizer", "read_site_data", "site_data",
           "token_strings", "write_site"]
