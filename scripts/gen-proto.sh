#!/usr/bin/env bash
# Regenerate Gossamer's protobuf and gRPC code from src/gossamer/proto/*.proto.
# Usage: scripts/gen-proto.sh   (run from anywhere; uses .venv/bin/python when present)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
cd "$ROOT/src"
"$PY" -m grpc_tools.protoc -I . \
    --python_out=. --grpc_python_out=. --pyi_out=. \
    gossamer/proto/*.proto
echo "regenerated: $(ls gossamer/proto/*_pb2*.py* | tr '\n' ' ')"
