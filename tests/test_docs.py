"""What can be checked of the docs build without Quarto: nbdev's notebook pre-processing, then every processed
notebook rendered to HTML with nbconvert, in a copy of the repository."""
import shutil
import subprocess
import sys

from conftest import ROOT
from mlops_basics.test_utils import BIN


def test_notebooks_preprocess_and_render_to_html(tmp_path):
    copy = tmp_path/"repo"
    copy.mkdir()
    for name in ("settings.ini", "README.md", "setup.py"): shutil.copy(ROOT/name, copy/name)
    shutil.copytree(ROOT/"nbs", copy/"nbs", ignore=shutil.ignore_patterns(".ipynb_checkpoints", "_proc", "_docs"))
    shutil.copytree(ROOT/"mlops_basics", copy/"mlops_basics", ignore=shutil.ignore_patterns("__pycache__"))
    # The docs build runs in the whole checkout, where a page may import the test suite's helpers (nbdev runs import cells).
    shutil.copytree(ROOT/"tests", copy/"tests", ignore=shutil.ignore_patterns("__pycache__"))
    # nbdev_proc_nbs itself would try to install Quarto (and pip install the project); run its steps without that
    script = ("from nbdev.quarto import refresh_quarto_yml, nbdev_sidebar; from nbdev.serve import proc_nbs; "
              "refresh_quarto_yml(); nbdev_sidebar.__wrapped__(); proc_nbs(n_workers=0)")
    proc = subprocess.run([sys.executable, "-c", script], cwd=copy, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    processed = sorted((copy/"_proc").glob("*.ipynb"))
    notebooks = sorted(p.name for p in (ROOT/"nbs").glob("*.ipynb"))
    assert [p.name for p in processed] == notebooks
    assert (copy/"_proc"/"sidebar.yml").exists()
    html = tmp_path/"html"
    proc = subprocess.run([str(BIN/"jupyter"), "nbconvert", "--to", "html", "--output-dir", str(html), *map(str, processed)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for nb in processed:
        page = (html/f"{nb.stem}.html").read_text()
        assert "<html" in page and len(page) > 10_000, nb.name
    # nbdev moved each notebook's title into Quarto front matter; the rendered page still shows its text
    assert "the CoLA data" in (html/"00a_data.html").read_text()
