#!/usr/bin/env bash
# Re-pins scripts/constraints.txt to the newest releases that pyproject.toml's ranges admit,
# and only once the whole test suite has passed with them, in a fresh venv:
#     bash scripts/refresh-lock.sh
# Then commit scripts/constraints.txt and note the date in docs/contributing.md.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="$(mktemp -d)/venv"
python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
IRLM_NO_LOCK=1 bash scripts/install.sh
python3 -m pytest -q -n 2 --dist loadfile
{
  echo "# The versions the test suite last passed with (scripts/refresh-lock.sh, $(date -u +%F),"
  echo "# Python $(python3 -c 'import platform; print(platform.python_version())')). Used by scripts/install.sh."
  python3 -m pip freeze --exclude-editable | grep -v -i -E '^irlm([ =@]|$)'
} > scripts/constraints.txt.new
mv scripts/constraints.txt.new scripts/constraints.txt
echo "scripts/constraints.txt refreshed: $(grep -c '==' scripts/constraints.txt) pins"
