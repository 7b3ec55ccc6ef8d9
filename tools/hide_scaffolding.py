"""Mark the notebooks' scaffolding `#| hide`: cells of checks only (test_eq, test_fail, assert, ...), the test imports, the
IN_TEST switch and environment set-up. Prints what it marks; `--check` only reports (exit 1 if anything would change)."""

import json
import re
import sys
from pathlib import Path

CHECK = re.compile(
    r"^(test_\w+\(|assert\b|IN_TEST\s*=|os\.environ(\[|\.setdefault|\.update|\.pop)|warnings\.filterwarnings|torch\.set_num_threads|"
    r"atexit\.register|logging\.getLogger\([^)]*\)\.setLevel)"
)


def statements(src: str) -> list[str]:
    "The cell's top-level lines (continuations and comments dropped)."
    return [l for l in src.splitlines() if l.strip() and not l[0].isspace() and not l.lstrip().startswith("#") and l[0] not in ")]}"]


def is_scaffolding(src: str) -> bool:
    if re.search(r"^#\|\s*(export|exporti|hide|default_exp|exec_doc)", src, re.M):
        return False
    lines = statements(src)
    if not lines:
        return False
    if "fastcore.test" in src and all(l.startswith(("import ", "from ")) for l in lines):
        return True
    return all(CHECK.match(l) for l in lines)


def mark(path: Path, check: bool) -> int:
    nb = json.loads(path.read_text())
    changed = 0
    for c in nb["cells"]:
        src = "".join(c["source"])
        if c["cell_type"] == "code" and is_scaffolding(src):
            changed += 1
            if not check:
                flags = re.match(r"((?:#\|[^\n]*\n)*)", src).group(1)
                c["source"] = (flags + "#| hide\n" + src[len(flags) :]).splitlines(True)
    if changed and not check:
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return changed


if __name__ == "__main__":
    check = "--check" in sys.argv
    total = {p.name: mark(p, check) for p in sorted(Path("nbs").glob("*.ipynb"))}
    for name, n in total.items():
        if n:
            print(f"{name}: {n} cell(s) {'to hide' if check else 'hidden'}")
    sys.exit(1 if check and any(total.values()) else 0)
