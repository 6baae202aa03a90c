"""Larger English corpora that install offline from a package registry, as documents.

`python-docs`: the reStructuredText sources of the Python documentation that Debian's
`python3-doc` package installs (`apt-get install python3-doc`; Python 3.11's: 497 files,
11 MB, about 3.3 M MiniLM-L6 tokens): the tutorial, the library and language references, the
HOWTOs, the C API and the "What's New" pages; its licence and copyright pages are left out.  Python's own `pydoc_data.topics` (the embedded
default text, 122 K tokens) is a small excerpt of the language reference.

    from switchsae.data import corpora
    texts = corpora.texts("python-docs")           # list[str], each at most 300 characters
    corpora.write_jsonl("python-docs", "pydocs.jsonl")   # for `switchsae train --text pydocs.jsonl`
    python -m switchsae.data.corpora python-docs pydocs.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Iterator

from .texts import _UNDERLINE, _chunk_paragraphs
from .sources import DataError

DOC_ROOTS = ("/usr/share/doc/python3*/html/_sources",)
LICENCE_PAGES = ("license.rst.txt", "copyright.rst.txt")  # licence texts: never training data
_DIRECTIVE = re.compile(r"\s*\.\. [\w:-]+::")  # `.. index:: ...`, `.. function:: len(s)`, ...


def python_docs_root(root: str | os.PathLike | None = None) -> Path:
    """The `_sources` directory of an installed python3-doc (the newest Python version when
    several are installed), or `root` itself after checking it holds .rst.txt files."""
    if root is not None:
        found = [Path(root)]
    else:
        found = sorted((p for pattern in DOC_ROOTS for p in Path("/").glob(pattern.lstrip("/"))),
                       key=lambda p: [int(v) for v in re.findall(r"\d+", p.parts[-3])])
    for path in reversed(found):
        if path.is_dir() and next(path.rglob("*.rst.txt"), None) is not None:
            return path
    where = root if root is not None else " or ".join(DOC_ROOTS)
    raise DataError(f"no Python documentation sources (*.rst.txt) in {where}: install them with "
                    "`apt-get install python3-doc` (Debian/Ubuntu), or pass root=")


def python_docs(root: str | os.PathLike | None = None, max_chars: int = 300) -> Iterator[str]:
    """Documents of the Python documentation: every page's blank-line-separated paragraphs
    (the licence and copyright pages left out; whitespace collapsed; title underlines dropped, and blocks that are one directive line
    such as `.. index:: single: len` or `.. function:: len(s)`, whose text is markup or a
    signature the next paragraph describes), packed into chunks of at most `max_chars`
    characters, pages in path order."""
    base = python_docs_root(root)
    for page in sorted(base.rglob("*.rst.txt")):
        if page.name in LICENCE_PAGES:
            continue
        raw = _UNDERLINE.sub("", page.read_text(encoding="utf-8", errors="replace"))
        paras = []
        for block in re.split(r"\n\s*\n", raw):
            text = " ".join(block.split())
            if text and not (_DIRECTIVE.match(block) and "\n" not in block.strip()):
                paras.append(text)
        yield from _chunk_paragraphs(paras, max_chars)


CORPORA = {"python-docs": python_docs}


def texts(name: str, **kwargs) -> list[str]:
    """The documents of corpus `name` (one of `CORPORA`)."""
    if name not in CORPORA:
        raise DataError(f"unknown corpus {name!r}; known: {sorted(CORPORA)}")
    out = list(CORPORA[name](**kwargs))
    if not out:
        raise DataError(f"corpus {name!r} has no text")
    return out


def write_jsonl(name: str, path: str | os.PathLike, max_texts: int | None = None, **kwargs) -> int:
    """Write corpus `name` (its first `max_texts` documents) as JSON lines `{"text": ...}`
    (what `read_texts` and `switchsae train --text` read), atomically; -> number of documents."""
    from switchsae.files import atomic_write_bytes

    docs = texts(name, **kwargs)[:max_texts]
    atomic_write_bytes(Path(path), "".join(json.dumps({"text": t}) + "\n" for t in docs).encode())
    return len(docs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m switchsae.data.corpora",
                                description="write an installed corpus as JSON lines")
    p.add_argument("name", choices=sorted(CORPORA))
    p.add_argument("out", help="output .jsonl file")
    args = p.parse_args(argv)
    try:
        n = write_jsonl(args.name, args.out)
    except DataError as e:
        print(f"python -m switchsae.data.corpora: error: {e}")
        return 2
    print(f"wrote {n} documents of {args.name} to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
