#!/usr/bin/env bash
# The pinned venvs in which QSIPrep's own input handling judges each QSIPrep run before it starts
# (the preflight: neuroflow_dagster/preflight/, docs/tools.md "The QSIPrep preflight").
#
#   scripts/qsiprep-preflight-venv.sh [DIR [VERSION...]]   (default: .venv-preflight next to .venv, every locked version)
#
# One full install of QSIPrep per version (1.1.1 and 26.1.1), each from its committed lock
# (neuroflow_dagster/preflight/locks/, `pip freeze` of a resolved install) installed --no-deps, so the
# same packages every time. ~1.5 GB and 2-6 min each on a warm pip cache. Idempotent: a stamp holding
# the lock's sha256 makes a second call return at once; a changed lock rebuilds. Prints one venv per line.
# Production builds the same venvs with `neuroflow preflight install` (into pipelines.qsiprep.preflight.venvs_dir).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${1:-$here/.venv-preflight}"
[ "$#" -gt 0 ] && shift
project_python="${PROJECT_VENV:-$here/.venv}/bin/python"
if [ ! -x "$project_python" ]; then
  echo "error: project venv not found at ${PROJECT_VENV:-$here/.venv} (run make install first)" >&2
  exit 3
fi
args=()
for version in "$@"; do args+=(--version "$version"); done
exec "$project_python" -m neuroflow_dagster.preflight.venvs --dir "$dir" "${args[@]}"
