"""Packaging for mlops-basics: everything comes from settings.ini, nbdev's single source of metadata."""
from configparser import ConfigParser
from pathlib import Path

import setuptools

here = Path(__file__).parent
config = ConfigParser(delimiters=["="])
config.read(here / "settings.ini", encoding="utf-8")
cfg = config["DEFAULT"]

for key in "lib_name version description user author author_email license min_python".split():
    if key not in cfg: raise KeyError(f"settings.ini is missing the required key {key!r}")

licenses = {"apache2": "Apache-2.0"}  # settings.ini's name -> the SPDX expression setuptools wants (license classifiers are deprecated)
statuses = ["1 - Planning", "2 - Pre-Alpha", "3 - Alpha", "4 - Beta", "5 - Production/Stable", "6 - Mature", "7 - Inactive"]
lic = licenses.get(cfg["license"].lower(), cfg["license"])

def requirements(key):
    "The space-separated requirement list `key` of settings.ini."
    return cfg.get(key, "").split()

extras = {name: requirements(f"{name}_requirements") for name in ("train", "offline", "serve", "pipeline", "lambda", "aws", "monitoring", "batch", "orchestration", "registry", "registry_server", "dev", "mlserver")}
extras = {name: reqs for name, reqs in extras.items() if reqs}
# mlserver pins an older FastAPI and protobuf than the rest: it gets its own environment (`make mlserver`), never `all`
extras["all"] = sorted({req for name, reqs in extras.items() if name not in ("mlserver", "registry_server") for req in reqs})

setuptools.setup(
    name=cfg["repo"],
    version=cfg["version"],
    description=cfg["description"],
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    author=cfg["author"],
    author_email=cfg["author_email"],
    license_expression=lic,
    keywords=cfg.get("keywords", ""),
    url=cfg["git_url"],
    classifiers=[
        "Development Status :: " + statuses[int(cfg["status"]) - 1],
        "Intended Audience :: " + cfg["audience"].title(),
        "Natural Language :: " + cfg["language"].title(),
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: " + cfg["min_python"],
    ],
    # The Hydra configs' folders (conf/, conf/model/, ...) hold only YAML: namespace packages, listed as setuptools asks of data folders
    packages=setuptools.find_namespace_packages(include=[cfg["lib_name"], cfg["lib_name"] + ".*"], exclude=["*.__pycache__"]),
    package_data={cfg["lib_name"]: requirements("package_data")},
    include_package_data=True,
    python_requires=">=" + cfg["min_python"],
    install_requires=requirements("requirements"),
    extras_require=extras,
    entry_points={
        "console_scripts": requirements("console_scripts"),
        "mlops_basics.image_builders": requirements("image_builders"),
        "mlops_basics.canary_metrics": requirements("canary_metrics"),
        "nbdev": [f"{cfg['lib_name']}={cfg['lib_name']}._modidx:d"],
    },
    zip_safe=False,
)
