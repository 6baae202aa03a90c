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

from .data import site_data

ASSETS = ("index.html", "style.css", "app.js")
DATA_FILE = "data.js"
DATA_GLOBAL = "SWITCHSAE_DATA"


def write_site(data: dict, out_dir: str | os.PathLike) -> Path:
    """Write the site for `data` (a `site_data` dict) into `out_dir`; -> path of index.html."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    assets = resources.files(__package__) / "assets"
    for name in ASSETS:
        atomic_write_bytes(out / name, (assets / name).read_bytes())
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    atomic_write_bytes(out / DATA_FILE, f"window.{DATA_GLOBAL} = {payload};\n".encode("utf-8"))
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
