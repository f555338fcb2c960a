#!/usr/bin/env bash
# Create the environment (uv, torch, the Rust tokenizer trainer) and run the test suite.
# Usage: bash test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")"
source ./setup_env.sh
# Let Python cache bytecode: torch imports are several times faster on every later process.
unset PYTHONDONTWRITEBYTECODE
exec uv run --no-sync python -m pytest "$@"
