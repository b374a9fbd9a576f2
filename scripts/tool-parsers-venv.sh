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
#   - the qsiprep 1.1.1 (the default image's version), 26.0.0 (the last release with 1.x's flag
#     names) and 26.1.1 wheels are unpacked into folders of their own (the test's PYTHONPATH picks one);
#   - TEMPLATEFLOW_HOME points at an empty stub dataset: QSIPrep's config module indexes
#     TemplateFlow at import time (13 s on the full skeleton, ~0 on the stub).
# Idempotent (scripts/layered-venv.sh): a stamp holding the pins makes a second call return at once.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/layered-venv.sh
source "$here/scripts/layered-venv.sh"
tools="${1:-$here/.venv-tools}"
# What the parsers import that the project venv lacks, with their own small dependencies.
# (qsiplan's bids2table is imported lazily, never by the parser.)
deps="pybids==0.22.0 templateflow==25.1.2 formulaic==1.2.2 interface-meta==2.0.1 wrapt==2.5.2
bids-validator==1.14.7.post0 bidsschematools==2.0.1 num2words==0.5.14 frozendict==2.5.1
qsiplan==0.5.0 qsiparc==0.1.2"
qsiprep_versions="1.1.1 26.0.0 26.1.1"
pins="$deps qsiprep $qsiprep_versions"

layered_venv_start "$tools" "$pins" neuroflow-tool-parsers
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
layered_venv_done "$tools" "$pins"
