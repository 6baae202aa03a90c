"""Write the feature browser: a static site that opens from disk (file://), no server.

    out_dir/index.html   the page (loads the three files below with relative paths)
    out_dir/style.css    styling
    out_dir/app.js       the browser (plain JavaScript, hand-drawn SVG and canvas plots)
    out_dir/data.js      `window.SWITCHSAE_DATA = {...}`: see `switchsae.inspect.data`

The data is a script rather than a .json fetched at run time, so no CORS rule blocks it
under file://.  Nothing is loaded from the network.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

from switchsae.files import atomic_write_bytes
from switchsae.validation import PathError

from .data import site_data

ASSETS = ("index.html", "style.css", "app.js")
DATA_FILE = "data.js"
DATA_GLOBAL = "SWITCHSAE_DATA"
_DATA_PREFIX = f"window.{DATA_GLOBAL} = ".encode()


def check_site_dir(out_dir) -> Path:
    """`out_dir` if the site may be written there: missing, or a directory where none of the
    site's files exist unless switchsae wrote them (its data.js is a browser data file); a
    user's own index.html or app.js is never overwritten.  Raises PathError."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PathError(f"browser directory {out} exists and is not a directory")
    if out.is_dir() and not _is_site(out):
        taken = [name for name in (*ASSETS, DATA_FILE) if (out / name).exists()]
        if taken:
            raise PathError(f"{out} holds {', '.join(taken)} not written by switchsae; not overwriting "
                            "(choose another --out)")
    return out


def _is_site(out: Path) -> bool:
    try:
        with open(out / DATA_FILE, "rb") as f:
            return f.read(len(_DATA_PREFIX)) == _DATA_PREFIX
    except OSError:
        return False


def write_site(data: dict, out_dir: str | os.PathLike) -> Path:
    """Write the site for `data` (a `site_data` dict) into `out_dir` (see `check_site_dir`);
    -> path of index.html."""
    out = check_site_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    assets = resources.files(__package__) / "assets"
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    atomic_write_bytes(out / DATA_FILE, _DATA_PREFIX + f"{payload};\n".encode("utf-8"))  # written first:
    for name in ASSETS:  # it marks the directory as the site's
        atomic_write_bytes(out / name, (assets / name).read_bytes())
    return out / "index.html"


def read_site_data(out_dir: str | os.PathLike) -> dict:
    """The data dict back from a written site's data.js."""
    text = (Path(out_dir) / DATA_FILE).read_text(encoding="utf-8")
    prefix = f"window.{DATA_GLOBAL} = "
    if not text.startswith(prefix):
        raise ValueError(f"{Path(out_dir) / DATA_FILE} is not a switchsae browser data file")
    return json.loads(text[len(prefix):].rstrip().rstrip(";"))


def build_site(sae, corpus, out_dir: str | os.PathLike, **options) -> Path:
    """Build the feature browser of `sae` (a SwitchSAE) on `corpus` (a `Corpus`: activations
    with their tokens) in `out_dir`; -> path of index.html.  `options`: see `site_data`."""
    return write_site(site_data(sae, corpus, **options), out_dir)
