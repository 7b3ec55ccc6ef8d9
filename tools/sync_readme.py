"""Render nbs/index.ipynb (the docs home page) to README.md, or check that README.md is up to date.

nbdev_readme does this with Quarto, which is not installable everywhere; this renders the same content:
markdown cells as they are, code cells as fenced Python with their text outputs. Cells marked `#| hide` are left out.

    python tools/sync_readme.py          # rewrite README.md
    python tools/sync_readme.py --check  # exit 1 if README.md differs
"""

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK, README = ROOT / "nbs" / "index.ipynb", ROOT / "README.md"
HEADER = "<!-- Generated from nbs/index.ipynb by tools/sync_readme.py: edit the notebook, not this file. -->\n\n"


def _source(cell) -> str:
    src = cell["source"]
    return "".join(src) if isinstance(src, list) else src


def _text_outputs(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream" and out.get("name") == "stdout":
            parts.append("".join(out["text"]))
        elif out["output_type"] in ("execute_result", "display_data") and "text/plain" in out.get("data", {}):
            parts.append("".join(out["data"]["text/plain"]) + "\n")
    return "".join(parts)


def github_links(markdown: str) -> str:
    "Links and diagrams as GitHub shows the README: a page `name.html` is the notebook `nbs/name.ipynb`, an image `images/...` is under `nbs/`."

    # the site names a page as nbdev does, without its number: 00a_data.ipynb is data.html
    notebooks = {re.sub(r"^\d+[a-zA-Z0-9]*_", "", nb.stem): nb.name for nb in (ROOT / "nbs").glob("*.ipynb")}

    def page(m):
        name = m.group(2)
        return f"]({'nbs/' + notebooks[name] if name in notebooks else name + '.html'}{m.group(3) or ''})"

    markdown = re.sub(r"\]\((?!https?:)(([\w-]+))\.html(#[\w-]+)?\)", page, markdown)
    markdown = markdown.replace("```{mermaid}", "```mermaid")  # Quarto's diagram block, as GitHub spells it
    return re.sub(r"\]\((images/[^)\s]+)\)", r"](nbs/\1)", markdown)


def render(notebook: Path = NOTEBOOK) -> str:
    "README text for `notebook`."
    blocks = []
    for cell in json.loads(notebook.read_text())["cells"]:
        source = _source(cell)
        if cell["cell_type"] == "markdown":
            blocks.append(github_links(source.strip()))
        elif cell["cell_type"] == "code":
            lines = source.splitlines()
            if any(l.strip() in ("#| hide", "#|hide") for l in lines):
                continue
            code = "\n".join(l for l in lines if not l.lstrip().startswith("#|")).strip()
            if code:
                blocks.append(f"```python\n{code}\n```")
            if output := _text_outputs(cell).rstrip():
                blocks.append(f"```\n{output}\n```")
    return HEADER + "\n\n".join(blocks) + "\n"


def main(argv) -> int:
    text = render()
    if "--check" in argv:
        if README.read_text() != text:
            print("README.md is out of date with nbs/index.ipynb: run `python tools/sync_readme.py`", file=sys.stderr)
            return 1
        return 0
    README.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
