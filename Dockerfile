# syntax=docker/dockerfile:1
# The serving image: the mlops-basics wheel with its serve and lambda extras (no torch), and a serving directory.
#   dvc pull export                      # or: mlops-export artifacts/model artifacts/serving
#   docker build -t mlops-basics .       # BASE and SERVING_DIR can be changed with --build-arg
#   docker run -p 8080:8080 mlops-basics             # HTTP on :8080 (uvicorn)
#   docker run mlops-basics lambda                   # the AWS Lambda runtime client
# Behind a TLS-intercepting proxy, pass its CA bundle as a build secret (never a layer):
#   docker build --secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt .
ARG BASE=python:3.11-slim

FROM ${BASE} AS wheel
WORKDIR /src
COPY setup.py settings.ini README.md LICENSE ./
COPY mlops_basics ./mlops_basics
RUN --mount=type=secret,id=ca_bundle,required=false \
    if [ -f /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi; \
    python3 -m venv /build && /build/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

FROM ${BASE}
ARG SERVING_DIR=artifacts/serving
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MLOPS_SERVING_DIR=/opt/mlops/serving \
    PORT=8080
COPY constraints.txt /tmp/constraints.txt
COPY --from=wheel /dist/ /tmp/dist/
# Versions come from constraints.txt, which pins every package the serve and lambda extras need.
# hadolint ignore=DL3013,DL3042
RUN --mount=type=secret,id=ca_bundle,required=false \
    if [ -f /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi; \
    python3 -m venv /opt/venv \
    && wheel="$(ls /tmp/dist/mlops_basics-*.whl)" \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check -c /tmp/constraints.txt "${wheel}[serve,lambda]" \
    && rm -rf /tmp/dist /tmp/constraints.txt \
    && useradd --system --uid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin mlops
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/mlops-entrypoint
COPY ${SERVING_DIR} /opt/mlops/serving
USER mlops
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('PORT', '8080')}/health\", timeout=4)"]
ENTRYPOINT ["mlops-entrypoint"]
CMD ["serve"]
