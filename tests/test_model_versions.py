"""One model, one story: every page's outputs and every benchmark result name the model that ships (reports/metrics.json),
or a comparison that benchmarks/comparisons.yml lists with its reason."""

import json
import re
from pathlib import Path

import yaml

from conftest import ROOT

VERSION = re.compile(r"\b[0-9a-f]{12}-(?:int8|fp32)\b")  # what /health, the logs and the results call a model: sha256 prefix and variant
LISTED = yaml.safe_load((ROOT / "benchmarks" / "comparisons.yml").read_text())


def shipped() -> set[str]:
    "The versions of the model that ships: its served variant and the other variant of the same run."
    metrics = json.loads((ROOT / "reports" / "metrics.json").read_text())
    return {metrics["model_version"], *metrics.get("variant_versions", {}).values()}


def shown(path: Path) -> set[str]:
    "The model versions a page's outputs and prose (not its code) or a result file names."
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text())["cells"]
        text = json.dumps([c.get("outputs", []) for c in cells] + ["".join(c["source"]) for c in cells if c["cell_type"] == "markdown"])
    else:
        text = path.read_text()
    return set(VERSION.findall(text))


def sources() -> list[Path]:
    return sorted((ROOT / "nbs").glob("*.ipynb")) + sorted((ROOT / "benchmarks" / "results").glob("*.json"))


def test_every_page_and_result_shows_the_model_that_ships():
    allowed = {c["version"]: set(c["shown_in"]) for c in LISTED["comparisons"]}
    found = []
    for path in sources():
        name = str(path.relative_to(ROOT))
        others = {v for v in shown(path) - shipped() if name not in allowed.get(v, ())}
        found += [f"{name}: {v}" for v in sorted(others)]
    assert not found, f"not the model that ships ({sorted(shipped())}) nor a listed comparison:\n" + "\n".join(found)


def test_every_result_names_a_model_or_says_why_not():
    unversioned = {e["file"] for e in LISTED["no_served_model"]}
    missing = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "benchmarks" / "results").glob("*.json")) if not shown(p) & shipped()]
    assert sorted(set(missing) - unversioned) == [], "a result names no model version: re-run it (make bench) or list it"
    assert sorted(unversioned - set(missing)) == [], "listed as naming no served model, but names the shipped one: drop the entry"


def test_every_listed_comparison_is_still_shown_and_says_why():
    for entry in LISTED["comparisons"]:
        assert entry["why"].strip() and entry["version"] not in shipped(), entry
        for name in entry["shown_in"]:
            assert entry["version"] in shown(ROOT / name), f"{entry['version']} is listed for {name}, which no longer shows it"
    assert all(e["why"].strip() and (ROOT / e["file"]).exists() for e in LISTED["no_served_model"])
