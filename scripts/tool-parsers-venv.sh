#!/usr/bin/env bash
# A small venv in which the REAL QSIPrep and QSIParc argument parsers can be imported,
# so the tests can feed them the command lines neuroflow generates.
#
#   scripts/tool-parsers-venv.sh [TOOLS_DIR]      (default: .venv-tools next to .venv)
#
# Why not `pip install qsiprep`: its wheel pins numpy<=1.26.3, pandas<2, nibabel<=5.3.2 ...
# for running workflows; the parser needs none of that. So:
#   - the venv is layered on the project venv (.venv): a .pth file makes the project's
#     packages (nipype, numpy, click, nibabel, parcellate ...) importable, read-only;
#   - it installs, --no-deps and pinned, only what the parsers import and the project lacks
#     (pybids, templateflow and their small dependencies, qsiplan, qsiparc 0.1.2);
#   - the qsiprep 1.1.1 (the default image's version) and 26.1.1 wheels are unpacked into
#     folders of their own (the test's PYTHONPATH picks one);
#   - TEMPLATEFLOW_HOME points at an empty stub dataset: QSIPrep's config module indexes
#     TemplateFlow at import time (13 s on the full skeleton, ~0 on the stub).
# Idempotent: a stamp holding the pins makes a second call return at once.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
project_venv="${PROJECT_VENV:-$here/.venv}"
tools="${1:-$here/.venv-tools}"
# What the parsers import that the project venv lacks, with their own small dependencies.
# (qsiplan's bids2table is imported lazily, never by the parser.)
deps="pybids==0.22.0 templateflow==25.1.2 formulaic==1.2.2 interface-meta==2.0.1 wrapt==2.5.2
bids-validator==1.14.7.post0 bidsschematools==2.0.1 num2words==0.5.14 frozendict==2.5.1
qsiplan==0.5.0 qsiparc==0.1.2"
qsiprep_versions="1.1.1 26.1.1"
pins="$deps qsiprep $qsiprep_versions"
stamp="$tools/.ready"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$pins" ]; then
  echo "$tools"
  exit 0
fi

project_python="$project_venv/bin/python"
if [ ! -x "$project_python" ]; then
  echo "error: project venv not found at $project_venv (run make install first)" >&2
  exit 3
fi
site_of() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }

# One builder at a time (two test processes may ask at once).
exec 9>"${TMPDIR:-/tmp}/neuroflow-tool-parsers.lock"
if command -v flock >/dev/null 2>&1; then flock 9; fi
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$pins" ]; then echo "$tools"; exit 0; fi

start=$(date +%s)
rm -rf "$tools"
"$project_python" -m venv --without-pip "$tools"
echo "$(site_of "$project_python")" > "$(site_of "$tools/bin/python")/neuroflow-project-venv.pth"
# The project's pip installs into the new venv (--python): no second copy of pip.
pip=("$project_python" -m pip --python "$tools/bin/python" --disable-pip-version-check --no-input)
# --no-deps with every pin given: no resolver run (the slow part), no clash with the project's pins.
# shellcheck disable=SC2086
"${pip[@]}" install --quiet --no-deps $deps
# Two QSIPrep versions side by side: a wheel is a zip of the package, so it is unpacked, not installed.
for version in $qsiprep_versions; do
  "${pip[@]}" download --quiet --no-deps --only-binary :all: -d "$tools/wheels" "qsiprep==$version"
  "$project_python" -m zipfile -e "$tools/wheels/qsiprep-$version-py3-none-any.whl" "$tools/qsiprep-$version"
done
rm -rf "$tools/wheels"
mkdir -p "$tools/templateflow"
printf '{"Name": "TemplateFlow stub (parser tests only)", "BIDSVersion": "1.4.0"}\n' \
  > "$tools/templateflow/dataset_description.json"
echo "$pins" > "$stamp"
echo "built $tools in $(( $(date +%s) - start )) s, $(du -sh "$tools" | cut -f1)" >&2
echo "$tools"
