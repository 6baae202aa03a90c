"""Documents to harvest: text files, tabular files and Hugging Face `datasets`.

`read_texts(source, text_column="text", one_per_line=False)` -> list of documents from
  - a `.txt` / `.md` file: one document per blank-line-separated paragraph, or per line
    with `one_per_line`;
  - a `.jsonl` / `.json`, `.csv` or `.parquet` file, read by `datasets` (streamed, so nothing
    is copied into a cache), the `text_column` of every row;
  - a folder written by `datasets.Dataset.save_to_disk` (a DatasetDict: its "train" split);
  - a `datasets.Dataset` or `datasets.IterableDataset` object.
Empty documents are dropped; anything else is a `DataError` naming the problem.  The default
corpus is English documentation shipped with Python (`default_texts`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

from .sources import DataError

PLAIN_SUFFIXES = (".txt", ".md")
TABLE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_UNDERLINE = re.compile(r"^\s*([*=\-~^#+])\1{2,}\s*$", re.M)


def _chunk_paragraphs(paragraphs: Sequence[str], max_chars: int) -> list[str]:
    """Greedily join paragraphs up to ``max_chars``; split longer ones at spaces."""
    out, cur = [], ""
    for p in paragraphs:
        while len(p) > max_chars:
            cut = p.rfind(" ", 0, max_chars)
            cut = max_chars if cut <= 0 else cut
            if cur:
                out.append(cur)
                cur = ""
            out.append(p[:cut])
            p = p[cut:].strip()
        if cur and len(cur) + 1 + len(p) > max_chars:
            out.append(cur)
            cur = ""
        cur = f"{cur} {p}" if cur else p
    if cur:
        out.append(cur)
    return out


def default_texts(max_chars: int = 300) -> list[str]:
    """English documentation text shipped with Python (``pydoc_data.topics``, ~465 KB).

    Topics in sorted order, split on blank lines, whitespace collapsed, ``****`` title
    underlines dropped, then packed into chunks of at most ``max_chars`` characters
    (300 chars is ~65 MiniLM tokens).
    """
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", _UNDERLINE.sub("", topics[key]))]
        out += _chunk_paragraphs([p for p in paras if p], max_chars)
    return out


def read_texts(source, text_column: str = "text", one_per_line: bool = False) -> list[str]:
    """Documents of `source` (see the module docstring), in order."""
    if not isinstance(text_column, str) or not text_column:
        raise DataError(f"text_column must be a non-empty string, got {text_column!r}")
    if not isinstance(source, (str, os.PathLike)):
        return _from_dataset(source, text_column, repr(type(source).__name__))
    path = Path(source)
    if path.is_dir():
        return _from_saved_dataset(path, text_column)
    if not path.is_file():
        raise DataError(f"text source {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in PLAIN_SUFFIXES:
        return _from_plain(path, one_per_line)
    if one_per_line:
        raise DataError(f"--one-per-line applies to plain text files ({', '.join(PLAIN_SUFFIXES)}), not {path}")
    if suffix in TABLE_BUILDERS:
        import datasets

        try:
            ds = datasets.load_dataset(TABLE_BUILDERS[suffix], data_files=str(path), split="train", streaming=True)
        except Exception as e:  # datasets raises many error types for unreadable files
            raise DataError(f"cannot read {path} as {TABLE_BUILDERS[suffix]}: {e}") from e
        return _from_dataset(ds, text_column, str(path))
    raise DataError(f"cannot read text from {path}: use a {'/'.join(PLAIN_SUFFIXES + tuple(TABLE_BUILDERS))} "
                    "file or a datasets save_to_disk folder")


def _from_plain(path: Path, one_per_line: bool) -> list[str]:
    from switchsae.validation import read_utf8

    raw = read_utf8(path, DataError)
    parts = raw.splitlines() if one_per_line else re.split(r"\n\s*\n", raw)
    texts = [p.strip() for p in parts if p.strip()]
    if not texts:
        raise DataError(f"no texts found in {path}")
    return texts


def _from_saved_dataset(path: Path, text_column: str) -> list[str]:
    if not ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        raise DataError(f"{path} is a folder but not one written by datasets' save_to_disk")
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises many error types for damaged folders
        raise DataError(f"cannot load the dataset saved in {path}: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path} holds splits {sorted(ds)}, no 'train'; save the split you want alone")
        ds = ds["train"]
    return _from_dataset(ds, text_column, str(path))


def _from_dataset(ds, text_column: str, where: str) -> list[str]:
    import datasets

    if not isinstance(ds, (datasets.Dataset, datasets.IterableDataset)):
        raise DataError(f"texts must come from a file path or a datasets.Dataset/IterableDataset, not {where}")
    columns = ds.column_names
    if columns is not None and text_column not in columns:
        raise DataError(f"{where} has no column {text_column!r} (columns: {columns}); pick one with --text-column")
    texts = []
    try:
        for n, row in enumerate(ds, 1):  # rows counted from 1, as lines of a file
            if text_column not in row:
                raise DataError(f"{where} row {n} has no column {text_column!r} (columns: {sorted(row)})")
            value = row[text_column]
            if value is None:
                raise DataError(f"{where} row {n} has no {text_column!r} value")
            if not isinstance(value, str):
                raise DataError(f"{where} row {n}: column {text_column!r} holds {type(value).__name__}, not text")
            if value.strip():
                texts.append(value)
    except DataError:
        raise
    except Exception as e:  # a parse error surfaces while streaming
        raise DataError(f"cannot read {where}: {e}") from e
    if not texts:
        raise DataError(f"no texts found in {where}")
    return texts
