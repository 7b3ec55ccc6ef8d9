"""Every notebook runs top to bottom in a Jupyter kernel, as in JupyterLab (its examples are its tests); slow cells run in slow tests."""

import ast
import json
import re
from pathlib import Path

import pytest
from fastcore.basics import AttrDict
from IPython.core.inputtransformer2 import TransformerManager
from nbclient.exceptions import CellExecutionError
from nbdev.process import extract_directives

from conftest import ROOT
from mlops_basics.devtools.pages import run_page

ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the colours of a kernel's traceback

NOTEBOOKS = sorted(p for p in (ROOT / "nbs").glob("*.ipynb") if not p.name.startswith("_"))


def has_flag(notebook: Path, flag: str) -> bool:
    cells = json.loads(notebook.read_text())["cells"]
    return any(cell["cell_type"] == "code" and any(line.strip() == f"#| {flag}" for line in "".join(cell["source"]).splitlines()) for cell in cells)


# Pages whose framework cannot share .venv (its pins clash with constraints.txt) name the kernel of their own environment in
# their metadata: its fixture makes the environment and registers the kernel before they run.
KERNEL_FIXTURES = {"mlops-prefect": "prefect_python"}


def kernel_of(notebook: Path) -> str:
    "The Jupyter kernel the notebook's metadata names (what JupyterLab starts for it)."
    return json.loads(notebook.read_text())["metadata"].get("kernelspec", {}).get("name", "python3")


def run_in_kernel(notebook: Path, request, *flags: str):
    "Run the page as JupyterLab does (a Jupyter kernel, its event loop), picking its cells as nbdev_test does, with IN_TEST set."
    if kernel_of(notebook) in KERNEL_FIXTURES:
        request.getfixturevalue(KERNEL_FIXTURES[kernel_of(notebook)])
    try:
        run_page(notebook, flags)
    except CellExecutionError as e:
        error = ANSI.sub("", str(e))[-8000:]
    else:
        return
    pytest.fail(f"{notebook.name} failed in its kernel ({kernel_of(notebook)}):\n{error}", pytrace=False)


# Pages whose slow cells start a program from another environment: that environment is made before they run.
SLOW_NEEDS = {"12a_mlserver": "mlserver_bin"}


# Pages that start a program from another environment: that environment is made before they run.
NEEDS = {"10c_model_registry": "mlflow_server_bin"}


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook(notebook, request):
    if notebook.stem in NEEDS:
        request.getfixturevalue(NEEDS[notebook.stem])
    run_in_kernel(notebook, request)


@pytest.mark.slow
@pytest.mark.parametrize("notebook", [p for p in NOTEBOOKS if has_flag(p, "slow")], ids=lambda p: p.stem)
def test_notebook_slow_cells(notebook, request):
    if notebook.stem in SLOW_NEEDS:
        request.getfixturevalue(SLOW_NEEDS[notebook.stem])
    run_in_kernel(notebook, request, "slow")


def imports_of(source: str) -> set[str]:
    "The modules a cell imports, at any depth, and the module it exports to (`#| default_exp`)."
    found = set(re.findall(r"^\s*(?:from|import) ([\w.]+)", source, re.M))
    return found | {f"mlops_basics.{m}" for m in re.findall(r"^#\| default_exp ([\w.]+)", source, re.M)}


PREFECT_MODULES = {"prefect"} | {  # the project's modules that import Prefect
    ".".join(p.relative_to(ROOT).with_suffix("").parts)
    for p in (ROOT / "mlops_basics").rglob("*.py")
    if "prefect" in {m.split(".")[0] for m in imports_of(p.read_text())}
}


def test_pages_that_use_prefect_name_its_kernel():
    "A page that uses Prefect (directly, or a module of the project that does) names .venv-prefect's kernel, so JupyterLab and the tests start it there."
    for notebook in NOTEBOOKS:
        modules = set().union(*(imports_of("".join(c["source"])) for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"))
        uses_prefect = any(m.split(".")[0] == "prefect" or m in PREFECT_MODULES for m in modules)
        assert (kernel_of(notebook) == "mlops-prefect") == uses_prefect, f"{notebook.name}: kernel {kernel_of(notebook)}"


def test_notebooks_are_clean_tutorial_pages():
    "Each notebook opens with a '# Week …' (or project) title and a one-line summary, and has at most one parameters cell."
    for notebook in NOTEBOOKS:
        cells = json.loads(notebook.read_text())["cells"]
        first = "".join(cells[0]["source"])
        assert cells[0]["cell_type"] == "markdown" and first.startswith("# "), notebook.name
        assert "\n> " in first, f"{notebook.name}: the title cell needs a '> summary' line"
        tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) <= 1, notebook.name


# What a reader sees is decided by directives only, as nbdev and Quarto treat them: `#| hide`, `#| export`, `#| exporti` and
# `#| default_exp` drop the cell from the page, `#| echo: false` and `#| include: false` its code, `#| output: false` its outputs.
HIDE_CELL = {"hide", "export", "exporti", "default_exp"}
TEST_MODULES = ("fastcore.test", "pytest", "unittest")  # the helpers of devtools.test_utils serve examples too (free ports, tiny models)
SET_UP = re.compile(
    r"(os\.environ\.(setdefault|update|pop|clear)|torch\.set_num_threads|warnings\.(filterwarnings|simplefilter|resetwarnings)|"
    r"logging\.(getLogger\(\)\.setLevel|disable)|atexit\.register)"
)
TEMP_DIR = re.compile(r"tempfile\.\w+")
PROGRESS_BAR = re.compile(r"\|[█▏▎▍▌▋▊▉ ]*█|\bit/s\]|s/it\]")
MODEL_SUMMARY = re.compile(r"Total params|\|\s*Name\s*\|\s*Type\s*\|")


def parse(source: str) -> ast.Module:
    "A cell's Python as a tree; top-level `await` allowed, as in a Jupyter kernel."
    return compile(source, "<cell>", "exec", ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def code_cells(notebook: Path) -> list[tuple[int, dict, dict]]:
    "Each code cell of `notebook`: its index, its directives as nbdev reads them, and the cell (the directives out of its source)."
    cells = json.loads(notebook.read_text())["cells"]
    found = []
    for i, cell in enumerate(cells):
        if cell["cell_type"] != "code":
            continue
        cell = AttrDict(cell, source="".join(cell["source"]))
        found.append((i, extract_directives(cell, remove=True), cell))
    return found


def shows_code(directives: dict) -> bool:
    "Whether a reader sees the cell's code."
    return not (directives.keys() & HIDE_CELL or directives.get("echo:") == ["false"] or directives.get("include:") == ["false"])


def dotted(node: ast.AST) -> str:
    "The dotted name a call or attribute reads: `os.environ.pop`, `logging.getLogger().setLevel`."
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Call):
        return f"{dotted(node.func)}()"
    return node.id if isinstance(node, ast.Name) else ""


def scaffolding(statement: ast.stmt) -> str | None:
    "What makes `statement` scaffolding (a check, a test import, the IN_TEST switch, environment set-up), or None."
    if isinstance(statement, (ast.Import, ast.ImportFrom)):
        modules = [statement.module or ""] if isinstance(statement, ast.ImportFrom) else [a.name for a in statement.names]
        return "a test import" if any(m == t or m.startswith(t + ".") for m in modules for t in TEST_MODULES) else None
    for node in ast.walk(statement):
        if isinstance(node, ast.Assert):
            return "a bare assert (show `test_eq` or `test_fail` instead)"
        if isinstance(node, ast.Name) and node.id == "IN_TEST" or isinstance(node, ast.Constant) and node.value == "IN_TEST":
            return "the IN_TEST switch"
        if isinstance(node, ast.Call) and SET_UP.fullmatch(dotted(node.func)):
            return "environment set-up"
        targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target] if isinstance(node, ast.AugAssign) else []
        if any(isinstance(t, ast.Subscript) and dotted(t.value) == "os.environ" for t in targets):
            return "environment set-up"
    return None


def bound(statement: ast.stmt) -> set[str]:
    "The names a top-level assignment binds."
    targets = (
        statement.targets
        if isinstance(statement, ast.Assign)
        else [statement.target]
        if isinstance(statement, (ast.AnnAssign, ast.AugAssign))
        else []
    )
    return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}


def read(tree: ast.AST) -> set[str]:
    "The names `tree` reads."
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def visibility_violations(notebook: Path) -> list[str]:
    "Every statement of a visible code cell that belongs in a `#| hide` cell, as `page cell N: why: statement`."
    to_python = TransformerManager().transform_cell  # IPython's magics and shell escapes as Python
    cells = [(i, shows_code(d), to_python(c.source)) for i, d, c in code_cells(notebook)]
    trees = [(i, visible, source, parse(source)) for i, visible, source in cells]
    found = []
    for n, (i, visible, source, tree) in enumerate(trees):
        if not visible:
            continue
        later = trees[n + 1 :]
        for k, statement in enumerate(tree.body):
            why = scaffolding(statement)
            names = bound(statement)
            if not why and names and any(TEMP_DIR.fullmatch(dotted(c.func)) for c in ast.walk(statement) if isinstance(c, ast.Call)):
                seen = set().union(*(read(s) for s in tree.body[k + 1 :]), *(read(t) for _, v, _, t in later if v))
                tests = set().union(*(read(t) for _, v, _, t in later if not v))
                why = "a temporary directory only the tests use" if names & tests and not names & seen else None
            if why:
                found.append(f"{notebook.stem} cell {i}: {why}: {ast.get_source_segment(source, statement).splitlines()[0]}")
    return found


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_visible_cells_hold_only_the_example(notebook):
    "A visible code cell holds the example, what explains it and its checks; test imports, IN_TEST and set-up go in `#| hide` cells."
    assert not (found := visibility_violations(notebook)), "move into a `#| hide` cell:\n" + "\n".join(found)


def test_no_progress_bars_or_model_summaries_in_outputs():
    "No output of any page shows a progress bar or Lightning's model summary."
    found = []
    for notebook in NOTEBOOKS:
        for i, _, cell in code_cells(notebook):
            text = json.dumps(cell.get("outputs", []), ensure_ascii=False)
            found += [f"{notebook.stem} cell {i}: {m.group(0)!r}" for pattern in (PROGRESS_BAR, MODEL_SUMMARY) if (m := pattern.search(text))]
    assert not found, "\n".join(found)


def mixed_import_cells(notebook: Path) -> list[str]:
    "Cells nbdev's docs pre-processing runs because they import, though they also run other code (nbdev's FAQ: keep imports alone)."
    to_python = TransformerManager().transform_cell
    found = []
    for i, directives, cell in code_cells(notebook):
        if directives.keys() & {"export", "exports", "exporti", "exec_doc"} or directives.get("eval:") == ["false"]:
            continue  # run by the pre-processing on purpose, or never run
        nodes = list(ast.walk(parse(to_python(cell.source))))
        if any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in nodes) and any(isinstance(n, (ast.Expr, ast.Assign)) for n in nodes):
            found.append(f"{notebook.stem} cell {i}: {cell.source.splitlines()[0]}")
    return found


def test_imports_stand_in_cells_of_their_own():
    "A cell that imports holds only imports: nbdev runs every importing cell to render the docs, without the cells before it."
    assert not (found := [f for notebook in NOTEBOOKS for f in mixed_import_cells(notebook)]), "split the imports out:\n" + "\n".join(found)


def names_of(source: str) -> tuple[set[str], set[str]]:
    "(names a cell binds anywhere in it, names it reads) of a code cell's Python."
    binds, reads = set(), set()
    for node in ast.walk(parse(source)):
        if isinstance(node, ast.Name):
            (reads if isinstance(node.ctx, ast.Load) else binds).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            binds.add(node.name)
        elif isinstance(node, ast.arg):
            binds.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            binds.update((a.asname or a.name).split(".")[0] for a in node.names)
    return binds, reads


def needs_slow_cells(notebook: Path) -> list[str]:
    "Cells that run without the `slow` flag but read a name only `#| slow` cells bind: the page would fail in a plain run."
    to_python = TransformerManager().transform_cell
    cells = [("slow" in d, *names_of(to_python(c.source)), i) for i, d, c in code_cells(notebook)]
    slow_only = set().union(*(b for slow, b, _, _ in cells if slow)) - set().union(*(b for slow, b, _, _ in cells if not slow))
    return [f"{notebook.stem} cell {i}: {', '.join(sorted(r & slow_only))}" for slow, _, r, i in cells if not slow and r & slow_only]


def test_plain_runs_need_no_slow_cell():
    "A page's run with the `slow` flag executes every cell of its plain run, and no plain cell reads what only a slow cell makes."
    assert not (found := [f for notebook in NOTEBOOKS for f in needs_slow_cells(notebook)]), "\n".join(found)
