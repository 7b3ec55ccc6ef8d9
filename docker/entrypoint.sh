#!/bin/sh
# The image's entrypoint: `serve` (default) runs the HTTP server (HOST, PORT, WORKERS), `lambda` the AWS Lambda runtime client
# (the default too where AWS_LAMBDA_RUNTIME_API is set, as on Lambda),
# `health` checks the HTTP server's /health (the image's HEALTHCHECK); anything else is run as a command.
set -e
command="${1:-serve}"
[ "$#" -gt 0 ] && shift
# On AWS Lambda (which sets AWS_LAMBDA_RUNTIME_API) the default command means the runtime client.
if [ "$command" = serve ] && [ "$#" -eq 0 ] && [ -n "${AWS_LAMBDA_RUNTIME_API:-}" ]; then command=lambda; fi
case "$command" in
  serve)  exec mlops-serve --host "${HOST:-0.0.0.0}" --port "${PORT:-8080}" --workers "${WORKERS:-1}" "$@" ;;
  lambda) exec python3 -m awslambdaric "${1:-mlops_basics.serving.lambda_handler.handler}" ;;
  health) exec python3 -c "import os, sys, urllib.request
try: urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('PORT', '8080')}/health\", timeout=4)
except Exception as e: sys.exit(f'unhealthy: {e}')" ;;
  *)      exec "$command" "$@" ;;
esac
