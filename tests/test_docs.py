"""What can be checked of the docs build without Quarto: nbdev's notebook pre-processing, then every processed
notebook rendered to HTML with nbconvert, in a copy of the repository; then what a reader sees on each page."""

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from mlops_basics.devtools.reading import HISTORY, TARGETS, TEACHING, reading, sections, shortfalls
from mlops_basics.devtools.test_utils import BIN

WEEK_PAGES = sorted(p.stem for p in (ROOT / "nbs").glob("[0-2]*.ipynb")) + ["benchmarks", "index"]
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/-])/(?:tmp|root|home|work|Users|private)/\S")
TINY_MODEL = re.compile(r"tiny-random-bert(?!,)")  # in outputs; the name in a list of the backbones one may choose is fine


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    "Every page as nbdev pre-processes it for Quarto, rendered to HTML by nbconvert; returns the HTML directory."
    tmp_path = tmp_path_factory.mktemp("docs")
    copy = tmp_path / "repo"
    copy.mkdir()
    for name in ("settings.ini", "README.md", "setup.py"):
        shutil.copy(ROOT / name, copy / name)
    shutil.copytree(ROOT / "nbs", copy / "nbs", ignore=shutil.ignore_patterns(".ipynb_checkpoints", "_proc", "_docs"))
    shutil.copytree(ROOT / "mlops_basics", copy / "mlops_basics", ignore=shutil.ignore_patterns("__pycache__"))
    # nbdev_proc_nbs itself would try to install Quarto (and pip install the project); run its steps without that
    script = (
        "from nbdev.quarto import refresh_quarto_yml, nbdev_sidebar; from nbdev.serve import proc_nbs; "
        "refresh_quarto_yml(); nbdev_sidebar.__wrapped__(); proc_nbs(n_workers=0)"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=copy, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    processed = sorted((copy / "_proc").glob("*.ipynb"))
    assert [p.name for p in processed] == sorted(p.name for p in (ROOT / "nbs").glob("*.ipynb"))
    assert (copy / "_proc" / "sidebar.yml").exists()
    html = tmp_path / "html"
    proc = subprocess.run(
        [str(BIN / "jupyter"), "nbconvert", "--to", "html", "--output-dir", str(html), *map(str, processed)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copytree(ROOT / "nbs" / "images", html / "images")  # what the pages link to, as the site has it
    return html


def test_notebooks_preprocess_and_render_to_html(rendered):
    for page in rendered.glob("*.html"):
        assert "<html" in page.read_text() and page.stat().st_size > 10_000, page.name
    # nbdev moved each notebook's title into Quarto front matter; the rendered page still shows its text
    assert "the CoLA data" in (rendered / "00a_data.html").read_text()


def _hidden_code(notebook: Path) -> list[str]:
    "A telling line of each `#| hide` cell: the longest one."
    cells = json.loads(notebook.read_text())["cells"]
    hidden = ["".join(c["source"]) for c in cells if c["cell_type"] == "code" and re.search(r"^#\|\s*hide\s*$", "".join(c["source"]), re.M)]
    return [max((l.strip() for l in src.splitlines() if not l.startswith("#|")), key=len) for src in hidden if src.strip()]


@pytest.mark.parametrize("page", WEEK_PAGES)
def test_a_week_page_shows_the_real_model_and_a_picture(rendered, page):
    "What a reader sees: a picture, none of the hidden scaffolding, no tiny test model, no machine path."
    html = (rendered / f"{page}.html").read_text()
    text = re.sub(r"<[^>]+>", " ", html)
    assert re.search(r"<img |<svg", html), f"{page}: no picture"
    import html as html_lib

    visible = html_lib.unescape(text)
    for line in _hidden_code(ROOT / "nbs" / f"{page}.ipynb"):
        assert line not in visible, f"{page}: hidden code shows: {line!r}"
    cells = json.loads((rendered.parent / "repo" / "_proc" / f"{page}.ipynb").read_text())["cells"]  # an API's docs may name the backbone
    outputs = json.dumps([o for c in cells if "show_doc(" not in "".join(c["source"]) for o in c.get("outputs", [])])
    assert not TINY_MODEL.search(outputs), f"{page}: an output shows the tiny test model"
    assert not ABSOLUTE_PATH.search(visible), f"{page}: shows a machine path: {ABSOLUTE_PATH.search(visible).group(0)!r}"


def test_screenshots_of_the_rendered_pages(rendered):
    "Headless Chromium draws the index and two week pages; the screenshots go to $MLOPS_TEST_OUTPUT (the workflow uploads it)."
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    assert chromium, "Debian's chromium (or Chrome) is needed: .ci/system-packages installs it"
    from playwright.sync_api import sync_playwright

    out = Path(os.environ.get("MLOPS_TEST_OUTPUT") or rendered.parent / "screenshots") / "pages"
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            for name in ("index", "00a_data", "14a_drift"):
                page.goto((rendered / f"{name}.html").as_uri())
                page.wait_for_load_state("load")
                page.screenshot(path=str(out / f"{name}.png"), full_page=True)
                drawn = page.eval_on_selector_all("img, svg", "els => els.filter(e => e.getBoundingClientRect().width > 100).length")
                assert drawn >= 1, f"{name}: no picture drawn"
        finally:
            browser.close()
    assert sorted(p.name for p in out.glob("*.png")) == ["00a_data.png", "14a_drift.png", "index.png"]


def test_the_sidebar_is_the_course_then_next_steps_reference_and_contributors():
    "Four sections list every page once, and page numbers sort in reading order with none used twice."
    found = sections(ROOT / "nbs" / "sidebar.yml")
    assert list(found) == [*TEACHING, "Reference", "For contributors"]
    listed = [p for pages in found.values() for p in pages]
    assert sorted(listed) == sorted(p.stem for p in (ROOT / "nbs").glob("*.ipynb") if p.stem != "index")
    numbered = [p for p in listed if p[0].isdigit()]
    assert numbered == sorted(numbered), "the sidebar lists the pages in the order of their numbers"
    prefixes = [p.split("_")[0] for p in numbered]
    assert len(prefixes) == len(set(prefixes)), "a page number is used twice"
    assert len([p for p in found["The course"] if p.startswith("00")]) <= 3, "Week 0 is at most three pages"


def test_teaching_pages_read_as_a_course(rendered):
    "The course and next-steps pages, as the docs build processed them, hold the reading targets (devtools.reading)."
    proc = rendered.parent / "repo" / "_proc"
    found = sections(ROOT / "nbs" / "sidebar.yml")
    readings = [reading(proc / f"{page}.ipynb") for name in TEACHING for page in found[name]]
    short = [f"{r.page}: {'; '.join(why)}" for r in readings if (why := shortfalls(r))]
    assert not short, "\n".join(short)
    median = statistics.median(r.words_per_line for r in readings)
    assert median <= TARGETS["median_words_per_line"], f"median {median:.1f} words per visible code line"


def test_no_page_and_not_the_readme_tells_history():
    "What changed lives in CHANGELOG.md; every page and the README say what is."
    prose = {
        p.name: "\n".join("".join(c["source"]) for c in json.loads(p.read_text())["cells"] if c["cell_type"] == "markdown")
        for p in (ROOT / "nbs").glob("*.ipynb")
    }
    told = {name: HISTORY.findall(text) for name, text in {**prose, "README.md": (ROOT / "README.md").read_text()}.items()}
    assert not (told := {k: v for k, v in told.items() if v}), told


def test_the_readme_reads_in_three_minutes():
    "At most 1,200 words, code blocks and tables included."
    words = len((ROOT / "README.md").read_text().split())
    assert words <= 1200, f"README.md has {words} words"
