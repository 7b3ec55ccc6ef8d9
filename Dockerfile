# syntax=docker/dockerfile:1
# The serving image: the mlops-basics wheel with its serve and lambda extras (no torch), and a serving directory.
#   dvc pull export                      # or: mlops-export artifacts/model artifacts/serving
#   docker build -t mlops-basics .       # BASE and SERVING_DIR (a path inside the context) can be changed with --build-arg
#   docker run -p 127.0.0.1:8080:8080 mlops-basics    # HTTP on :8080 (uvicorn); WORKERS=2 for two server processes
#   docker run mlops-basics lambda                    # the AWS Lambda runtime client (the image as a Lambda function)
# Behind a TLS-intercepting proxy, pass its CA bundle as a build secret (mounted for one RUN, never in a layer):
#   docker build --secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt .
# podman: add `--format docker`, or the OCI format drops the HEALTHCHECK.
# checkov:skip=CKV_DOCKER_7: every FROM is ${BASE}, whose default python:3.11-slim checkov cannot resolve
ARG BASE=python:3.11-slim

# Stage 1: build the package's wheel (setup.py reads settings.ini; PEP 517 build isolation fetches setuptools and wheel).
FROM ${BASE} AS wheel
WORKDIR /src
COPY setup.py settings.ini README.md LICENSE ./
COPY mlops_basics ./mlops_basics
RUN --mount=type=secret,id=ca_bundle,required=false \
    if [ -f /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi; \
    python3 -m venv /build && /build/bin/pip wheel --no-cache-dir --disable-pip-version-check --use-pep517 --no-deps --wheel-dir /dist .

# Stage 2: the serving directory with only the variant it serves (metadata.json's default_variant); the other stays in DVC.
FROM ${BASE} AS model
ARG SERVING_DIR=artifacts/serving
COPY ${SERVING_DIR} /serving
RUN python3 -c "import json, pathlib; d = pathlib.Path('/serving'); m = json.loads((d / 'metadata.json').read_text()); \
[(d / v['file']).unlink() for name, v in m['variants'].items() if name != m['default_variant']]"

# Stage 3: the image itself, on the same base.
FROM ${BASE}
LABEL org.opencontainers.image.title="mlops-basics" \
      org.opencontainers.image.description="A CoLA grammar classifier served by FastAPI or AWS Lambda on ONNX Runtime" \
      org.opencontainers.image.licenses="Apache-2.0"
# ORT_DISABLE_TELEMETRY: ONNX Runtime's telemetry off (no uploads, no device-id file; it could not write one anyway).
# AWS_LAMBDA_LOG_FORMAT=JSON: the Lambda runtime client's own lines are JSON, like the app's (Lambda sets it from LoggingConfig).
ENV PATH=/opt/venv/bin:$PATH \
    AWS_LAMBDA_LOG_FORMAT=JSON \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ORT_DISABLE_TELEMETRY=1 \
    MLOPS_SERVING_DIR=/opt/mlops/serving \
    PORT=8080 \
    WORKERS=1
# The wheel and the lock are bind-mounted for this one step, so no layer keeps them. The dependencies come from
# docker/serve.lock, each by version and sha256 (`make lock` writes it from constraints.txt; CI checks it is current);
# the wheel itself then goes in without dependencies, and `pip check` proves the lock held all it needs. pip's cache is off.
RUN --mount=type=secret,id=ca_bundle,required=false \
    --mount=type=bind,from=wheel,source=/dist,target=/tmp/dist \
    --mount=type=bind,source=docker/serve.lock,target=/tmp/serve.lock \
    if [ -f /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi; \
    set -- /tmp/dist/mlops_basics-*.whl \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --require-hashes --no-deps -r /tmp/serve.lock \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps "$1" \
    && /opt/venv/bin/pip check \
    && groupadd --gid 10001 mlops \
    && useradd --uid 10001 --gid 10001 --no-log-init --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin mlops
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/mlops-entrypoint
# Owned by root and read-only for the server; mlops-export writes its files 0644, so the non-root user can read them.
COPY --from=model /serving /opt/mlops/serving
# A numeric user, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
# Fail the build, not the first request, when the serving directory is incomplete, corrupt or unreadable.
RUN python3 -c "from mlops_basics.serving.predictor import ONNXPredictor; ONNXPredictor('/opt/mlops/serving').predict(['It builds.'])"
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 CMD ["mlops-entrypoint", "health"]
ENTRYPOINT ["mlops-entrypoint"]
CMD ["serve"]
