"""switchsae.data.corpora: the python-docs corpus read from a documentation tree, its JSON
lines round trip through read_texts, and the errors for a missing tree or corpus."""

from __future__ import annotations

import pytest

from switchsae.data import DataError, corpora, read_texts

PAGE = """Built-in Types
**************

.. index:: pair: built-in; types

The following sections describe the standard types that are built into the interpreter.

.. function:: len(s)

   Return the length (the number of items) of an object.
   The argument may be a sequence.
"""


def docs_tree(tmp_path):
    root = tmp_path / "_sources"
    (root / "library").mkdir(parents=True)
    (root / "library" / "stdtypes.rst.txt").write_text(PAGE)
    (root / "about.rst.txt").write_text("About these documents\n=====================\n\n" + "word " * 100)
    (root / "notes.txt").write_text("not a page")  # only *.rst.txt pages count
    (root / "license.rst.txt").write_text("Terms and conditions for accessing Python")  # never used
    return root


def test_python_docs_are_paragraphs_in_chunks_pages_in_path_order(tmp_path):
    texts = list(corpora.python_docs(docs_tree(tmp_path), max_chars=120))
    assert all(len(t) <= 120 for t in texts)
    joined = " ".join(texts)
    assert texts[0] == "About these documents"  # about.rst.txt before library/; then its long paragraph
    assert texts[1].startswith("word word")
    assert "=====" not in joined and "*****" not in joined and "not a page" not in joined
    assert "Terms and conditions" not in joined
    assert ".. index::" not in joined and ".. function::" not in joined  # one-line directive blocks
    assert "Return the length (the number of items) of an object. The argument may be a sequence." in joined
    assert "The following sections describe the standard types" in joined


def test_write_jsonl_round_trips_through_read_texts(tmp_path):
    root = docs_tree(tmp_path)
    n = corpora.write_jsonl("python-docs", tmp_path / "docs.jsonl", root=root)
    assert read_texts(tmp_path / "docs.jsonl") == corpora.texts("python-docs", root=root)
    assert n == len(corpora.texts("python-docs", root=root)) > 1


def test_missing_tree_and_unknown_corpus_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="apt-get install python3-doc"):
        corpora.python_docs_root(tmp_path)
    with pytest.raises(DataError, match="unknown corpus 'gutenberg'"):
        corpora.texts("gutenberg")


def test_installed_python_docs_hold_millions_of_tokens_of_english():
    """CI installs Debian's python3-doc (.ci/run); ~9.5 M characters at 3.2 characters per
    MiniLM token (measured) is ~3 M tokens: well over 5 M characters."""
    texts = corpora.texts("python-docs")
    assert sum(map(len, texts)) > 5_000_000
    assert any("interpreter" in t for t in texts[:2000])
