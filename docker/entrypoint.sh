#!/bin/sh
# The image's entrypoint: `serve` (default) runs the HTTP server, `lambda` the AWS Lambda runtime client;
# anything else is run as a command.
set -e
command="${1:-serve}"
[ "$#" -gt 0 ] && shift
case "$command" in
  serve)  exec mlops-serve --host 0.0.0.0 --port "${PORT:-8080}" --workers "${WORKERS:-1}" "$@" ;;
  lambda) exec python3 -m awslambdaric "${1:-mlops_basics.lambda_handler.handler}" ;;
  *)      exec "$command" "$@" ;;
esac
