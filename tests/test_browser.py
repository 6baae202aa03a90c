"""The feature browser in a real browser: headless Chromium opens the site from disk
(file://, no server, no network), follows a feature URL and renders the feature.

Needs Chromium (Debian: `apt-get install -y chromium`).  Without it the test is skipped
outside CI and fails in CI (conftest.py).  The screenshot is kept under $SWITCHSAE_ARTIFACTS
(default: <tmp>/switchsae-artifacts) and its path printed."""

import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import switchsae
from switchsae.inspect import Corpus, build_site

CFG = switchsae.SwitchSAEConfig(d_in=16, n_latents=128, n_experts=4, k=4)
EXPERT, FEATURE = 2, 17
NEEDLE = " needle<&>"  # planted top token of feature 2/17; also checks HTML escaping
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--host-resolver-rules=MAP * ~NOTFOUND", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=5000", "--window-size=1280,900"]


@pytest.fixture(scope="module")
def chromium():
    found = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if found is None:
        pytest.skip("Chromium not found: install it (Debian: apt-get install -y chromium) to run the browser test")
    return found


def run_chromium(binary, profile, url, *args):
    proc = subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", *args, url],
                          capture_output=True, text=True, timeout=60, check=False)
    errors = [line for line in proc.stderr.splitlines() if "CONSOLE" in line and "Uncaught" in line]
    assert proc.returncode == 0 and not errors, f"chromium failed: rc={proc.returncode}\n{proc.stderr[-3000:]}"
    return proc.stdout


def planted_sae_and_corpus():
    """A small SAE whose feature 2/17 fires hardest on one token, NEEDLE, and a corpus of
    made-up words (20 documents of 15 tokens) around it."""
    params = switchsae.SwitchSAE.init(CFG, seed=0).numpy_params()
    m = CFG.expert_width
    u = params["W_dec"][EXPERT, FEATURE]  # unit decoder row
    params["W_enc"][EXPERT][:, FEATURE] = u
    params["W_router"][EXPERT] = 3 * u
    rng = np.random.default_rng(0)
    acts = rng.normal(scale=0.3, size=(300, CFG.d_in))
    words = ["alpha", " beta", " gamma", " delta", ",", " epsilon", " zeta", "."]
    tokens = [words[i] for i in rng.integers(0, len(words), 300)]
    for row, scale in ((40, 5.0), (130, 4.0), (222, 3.5)):
        acts[row] = scale * u
        tokens[row] = NEEDLE if scale == 5.0 else " pin"
    sae = switchsae.SwitchSAE.from_params(CFG, params, switchsae.get_backend("numpy"))
    assert EXPERT * m + FEATURE == 81
    return sae, Corpus(acts.astype(np.float32), tokens, np.repeat(np.arange(20), 15))


class _Text(HTMLParser):
    """Text of the page's <h1> and of the highlighted (centre) tokens of its contexts."""

    def __init__(self):
        super().__init__()
        self.h1, self.centres, self._in = "", [], []

    def handle_starttag(self, tag, attrs):
        cls = dict(attrs).get("class") or ""
        self._in.append("h1" if tag == "h1" else "centre" if "centre" in cls.split() else None)

    def handle_endtag(self, tag):
        self._in.pop()

    def handle_data(self, data):
        if "h1" in self._in:
            self.h1 += data
        if self._in and self._in[-1] == "centre":
            self.centres.append(data)


def test_feature_page_renders_from_disk(chromium, tmp_path, capsys):
    sae, corpus = planted_sae_and_corpus()
    out = sae.forward(corpus.acts)
    latent = EXPERT * CFG.expert_width + FEATURE
    value = np.where(np.asarray(out.top_indices) == latent, np.asarray(out.top_values), 0).sum(axis=1)
    top_token = corpus.tokens[int(np.argmax(value))]  # recomputed, not read from the site
    assert top_token == NEEDLE and np.count_nonzero(value) >= 3

    index = build_site(sae, corpus, tmp_path / "site")
    url = index.resolve().as_uri()
    dom = run_chromium(chromium, tmp_path / "profile", f"{url}#{EXPERT}/{FEATURE}", "--dump-dom")
    page = _Text()
    page.feed(dom)
    assert page.h1.startswith(f"Feature {EXPERT}/{FEATURE}")
    assert page.centres[0] == top_token and page.centres[:3] == [NEEDLE, " pin", " pin"]
    assert "latent #81" in dom and f"Top activations ({min(10, np.count_nonzero(value))})" in dom
    assert "Nearest features in other experts" in dom

    search = run_chromium(chromium, tmp_path / "profile", f"{url}#search/needle", "--dump-dom")
    assert "Tokens matching “needle”" in search and f'href="#{EXPERT}/{FEATURE}"' in search
    overview = run_chromium(chromium, tmp_path / "profile", url, "--dump-dom")
    assert "<h1>Overview</h1>" in overview and "duplicated" in overview and "Expert 3" in overview

    shot = tmp_path / "feature.png"
    run_chromium(chromium, tmp_path / "profile", f"{url}#{EXPERT}/{FEATURE}", f"--screenshot={shot}")
    from matplotlib.image import imread

    pixels = imread(shot)[..., :3]
    assert pixels.shape[:2] == (900, 1280)
    orange = (pixels[..., 0] > 0.95) & (np.abs(pixels[..., 1] - 0.63) < 0.12) & (pixels[..., 2] < 0.3)
    assert orange.sum() > 200, "no highlighted token or histogram bar in the screenshot"
    keep = Path(os.environ.get("SWITCHSAE_ARTIFACTS", Path(tempfile.gettempdir()) / "switchsae-artifacts"))
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, keep / "browser_feature_2_17.png")
    with capsys.disabled():
        print(f"\nfeature browser screenshot: {keep / 'browser_feature_2_17.png'}")


def test_unknown_feature_and_bad_search_are_handled(chromium, tmp_path):
    sae, corpus = planted_sae_and_corpus()
    url = build_site(sae, corpus, tmp_path / "site").resolve().as_uri()
    dom = run_chromium(chromium, tmp_path / "profile", f"{url}#{EXPERT}/{CFG.expert_width}", "--dump-dom")
    assert "<h1>Not found</h1>" in dom and f"Expert {EXPERT} has no feature {CFG.expert_width}" in dom
    dom = run_chromium(chromium, tmp_path / "profile", f"{url}#search/%E0%A4%A", "--dump-dom")  # malformed escape
    assert "No token matches." in dom
