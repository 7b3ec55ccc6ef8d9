"""What installing costs: the release build, each extra's fresh environment (measured by tests/test_install.py), and
`make install`, the step of `make run` that sets up .venv, on a fresh clone. Writes benchmarks/results/install.json.

    .venv/bin/python benchmarks/install_benchmark.py   # about 10 minutes on 2 cores with pip's cache warm
"""

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "install.json"


def timed(*args, **kwargs) -> float:
    "Seconds the command took; it must succeed (its output's end is shown if not)."
    start = time.perf_counter()
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    if proc.returncode:
        sys.exit(f"{' '.join(map(str, args))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return round(time.perf_counter() - start, 1)


def megabytes(directory: Path) -> float:
    return round(sum(p.stat().st_size for p in directory.rglob("*") if p.is_file() and not p.is_symlink()) / 1e6, 1)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run(["git", "clone", "-q", str(ROOT), str(work / "clone")], check=True)
        build_s = timed(sys.executable, "-m", "build", "--outdir", work / "dist", work / "clone")
        extras = work / "extras.json"
        test_s = timed(
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_install.py",
            cwd=ROOT,
            env={**os.environ, "MLOPS_INSTALL_REPORT": str(extras)},
        )
        make_install_s = timed("make", "-C", work / "clone", "install")
        run_venv_mb = megabytes(next((work / "clone" / ".venv" / "lib").glob("python3*/site-packages")))
        results = {
            "date": date.today().isoformat(),
            "machine": f"{os.cpu_count()} CPUs, {platform.system()} {platform.machine()}, Python {platform.python_version()}",
            "note": "pip's cache warm (no download); installed_mb: site-packages less a fresh venv's (pip, setuptools), .pyc files included",
            "wheel_and_sdist_build_s": build_s,
            "wheel_mb": megabytes(work / "dist"),
            "extras": json.loads(extras.read_text()),
            "install_test_s": test_s,
            "make_install": {
                "what": "make install on a fresh clone: torch 2.13.0 CPU, then -e .[train,serve,pipeline]",
                "seconds": make_install_s,
                "minutes": round(make_install_s / 60),
                "site_packages_mb": run_venv_mb,
            },
        }
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
