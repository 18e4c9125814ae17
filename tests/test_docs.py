"""The documentation site: every tutorial is in the toctree, and a built site is complete.

The build itself (``sphinx-build -W -b html docs docs/_build/html``, run by ``.ci/run`` after
the tests) is the strict gate: a warning or a failing notebook cell fails it. The checks on
the built site run when one exists (in CI, the previous build's), and look for what a
build can get wrong without a warning: an unstyled page, a missing figure, an empty page,
error output kept in a notebook.
"""

from __future__ import annotations

import importlib
import inspect
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
SITE = DOCS / "_build" / "html"
TUTORIALS = sorted((DOCS / "tutorials").glob("*.md"))
THEME_CSS = "_static/styles/furo.css"


def toctree_entries(page: Path) -> list[str]:
    """The entries of the MyST ``{toctree}`` blocks of a page, option lines left out."""
    entries = []
    for block in re.findall(r"```\{toctree\}\n(.*?)```", page.read_text(), flags=re.S):
        entries += [line.strip() for line in block.splitlines()
                    if line.strip() and not line.strip().startswith(":")]
    return entries


def test_there_are_tutorials():
    assert len(TUTORIALS) >= 4, f"tutorials found: {[p.name for p in TUTORIALS]}"


@pytest.mark.parametrize("tutorial", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_in_toctree_and_a_notebook(tutorial):
    assert f"tutorials/{tutorial.stem}" in toctree_entries(DOCS / "index.md"), (
        f"{tutorial.relative_to(DOCS.parent)} is not in the toctree of docs/index.md: add "
        f"'tutorials/{tutorial.stem}' under its Tutorials caption")
    head = tutorial.read_text().split("---")[1]
    assert "file_format: mystnb" in head, f"{tutorial.name}: no 'file_format: mystnb' front matter"
    assert "```{code-cell}" in tutorial.read_text(), f"{tutorial.name} has no code cell"


class _Page(HTMLParser):
    """Stylesheets, images and the text of the main article of an HTML page."""

    def __init__(self):
        super().__init__()
        self.stylesheets: list[str] = []
        self.images: list[str] = []
        self.text: list[str] = []
        self._depth = 0  # inside <article>

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "link" and attrs.get("rel") == "stylesheet":
            self.stylesheets.append(attrs["href"].split("?")[0])
        elif tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "article":
            self._depth += 1

    def handle_endtag(self, tag):
        if tag == "article":
            self._depth -= 1

    def handle_data(self, data):
        if self._depth > 0:
            self.text.append(data)


def read_page(path: Path) -> tuple[_Page, str]:
    html = path.read_text(encoding="utf-8")
    page = _Page()
    page.feed(html)
    return page, html


def built_pages() -> list[str]:
    api = ["api/index", "api/cli", "api/generated/pyrovae.fit", "api/generated/pyrovae.VAE",
           "api/generated/pyrovae.priors", "api/generated/pyrovae.likelihoods"]
    return ["index"] + [f"tutorials/{p.stem}" for p in TUTORIALS] + api


needs_site = pytest.mark.skipif(not (SITE / "index.html").exists(),
                                reason="no built site (sphinx-build -W -b html docs docs/_build/html)")


def skip_if_stale(path: Path, source: Path) -> None:
    """Skip when the built page predates its source (a site from an earlier build, as CI
    sees before it builds the docs): its checks would be about another version."""
    if not path.exists() or path.stat().st_mtime < source.stat().st_mtime:
        pytest.skip(f"{path.name} is missing or older than {source.name}: the site in "
                    "docs/_build/html predates its last change; rebuild it")


@needs_site
@pytest.mark.parametrize("name", built_pages())
def test_built_page_is_styled_and_not_empty(name):
    path = SITE / f"{name}.html"
    if name.startswith("tutorials/"):
        skip_if_stale(path, DOCS / f"{name}.md")
    assert path.exists(), f"{path} was not built"
    page, _ = read_page(path)
    css = [href for href in page.stylesheets if href.endswith("furo.css")]
    assert css, f"{name}.html does not link the theme's stylesheet"
    for href in css:
        assert (path.parent / href).resolve().is_file(), f"{name}.html: {href} is missing"
    assert (SITE / THEME_CSS).stat().st_size > 10_000, "the theme's stylesheet is empty"
    words = " ".join(page.text).split()
    assert len(words) > 100, f"{name}.html has only {len(words)} words in its article"


@needs_site
@pytest.mark.parametrize("tutorial", TUTORIALS, ids=lambda p: p.stem)
def test_built_tutorial_shows_figures_and_no_errors(tutorial):
    path = SITE / "tutorials" / f"{tutorial.stem}.html"
    skip_if_stale(path, tutorial)
    page, html = read_page(path)
    figures = [src for src in page.images if not src.startswith(("http:", "https:", "data:"))]
    assert figures, f"{path.name} shows no figure"
    for src in figures:
        assert (path.parent / src).resolve().is_file(), f"{path.name}: image {src} is missing"
    # myst-nb renders an error as "output traceback" and anything written to stderr (a
    # dependency's warnings, say) as "output stderr"
    for sign in ("Traceback (most recent call last)", 'class="output traceback',
                 'class="output stderr'):
        assert sign not in html, f"{path.name} contains error or stderr output ({sign!r})"


# ------------------------------------------------------------------------ API reference
def api_entries() -> set[str]:
    """The names listed in the ``autosummary`` blocks of the API reference's sources."""
    names = set()
    for page in (DOCS / "api").glob("*.md"):
        for block in re.findall(r"\.\. autosummary::\n(.*?)```", page.read_text(), flags=re.S):
            names |= {line.strip() for line in block.splitlines()
                      if line.strip() and not line.strip().startswith(":")}
    return names


def test_every_public_name_has_an_api_entry():
    import pyrovae

    listed = api_entries()
    public = [name for name in pyrovae.__all__ if not name.startswith("_")]
    missing = [name for name in public if f"pyrovae.{name}" not in listed]
    assert not missing, f"pyrovae.__all__ names without an entry in docs/api/: {missing}"


def documented_modules() -> list[str]:
    found = []
    for name in sorted(api_entries()):
        try:
            module = importlib.import_module(name)
        except ImportError:  # a function or class, e.g. pyrovae.fit
            continue
        if inspect.ismodule(module):
            found.append(name)
    return found


def test_submodules_with_public_names_are_in_the_reference():
    for name in ("train", "checkpoint", "nn", "module", "progress", "testing"):
        assert f"pyrovae.{name}" in documented_modules(), f"pyrovae.{name} has no API page"


@needs_site
@pytest.mark.parametrize("module", documented_modules())
def test_every_name_of_a_module_is_on_its_page(module):
    """Each name of a documented module's ``__all__`` is on the module's built page (its
    own entry, or a link to the top-level one for names ``pyrovae`` exports)."""
    path = SITE / "api" / "generated" / f"{module}.html"
    skip_if_stale(path, DOCS / "api" / "index.md")
    page, _ = read_page(path)
    text = " ".join(page.text)
    names = getattr(importlib.import_module(module), "__all__", [])
    missing = [name for name in names if name not in text]
    assert not missing, f"{path.name} does not mention {missing}"


BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
SCREENSHOT_PAGES = ["index", "tutorials/quickstart", "api/generated/pyrovae.fit"]


@needs_site
@pytest.mark.skipif(BROWSER is None, reason="no headless Chromium on this machine")
@pytest.mark.parametrize("name", SCREENSHOT_PAGES)
def test_a_screenshot_of_the_built_page_is_styled(name, tmp_path):
    """Render the page in headless Chromium: a styled page has a light background, dark
    text, the theme's coloured links and the sidebar, so its pixels are far from one colour;
    an unstyled or empty build is a white page with a little black text."""
    pytest.importorskip("PIL")
    from PIL import Image

    page, shot = SITE / f"{name}.html", tmp_path / "page.png"
    subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1280,900", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    image = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert image.shape[:2] == (900, 1280)
    colours = {tuple(c) for c in image.reshape(-1, 3)[::7]}
    coloured = np.abs(image - image.mean(axis=2, keepdims=True)).max(axis=2) > 40
    inked = (image.sum(axis=2) < 600).mean()
    assert len(colours) > 50, f"{name}: {len(colours)} colours, an unstyled page"
    assert coloured.mean() > 1e-4, f"{name}: no coloured pixels (no theme links or accents)"
    assert 0.01 < inked < 0.9, f"{name}: {inked:.1%} of the page is ink"
    def background(strip):
        values, counts = np.unique(strip.reshape(-1, 3), axis=0, return_counts=True)
        return tuple(values[counts.argmax()])

    # furo's sidebar is shaded: its background is not the page's
    assert background(image[:, 5:90]) != background(image[:, 1180:]), f"{name}: no sidebar"
