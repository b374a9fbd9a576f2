#!/usr/bin/env bash
# A small venv with the REAL nipoppy, so the tests can read the files `neuroflow status --format nipoppy`
# writes with nipoppy's own table classes and its own `nipoppy status` command.
#
#   scripts/nipoppy-venv.sh [DIR]      (default: .venv-nipoppy next to .venv)
#
# Layered on the project venv (.venv) like scripts/tool-parsers-venv.sh: a .pth file makes the
# project's packages importable, read-only; installed --no-deps and pinned is only what nipoppy
# needs and the project lacks. nipoppy 0.4.8 pins none of what they share (pandas, pydantic, numpy,
# pydicom, rich, click have no upper bounds in its metadata), so nipoppy is tested against the
# project's versions of them - and fails here, loudly, the day one of them stops suiting it.
# Every pin given: no resolver run (the slow part of a pip install), no clash with the project's pins.
# Idempotent: a stamp holding the pins makes a second call return at once.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/layered-venv.sh
source "$here/scripts/layered-venv.sh"
target="${1:-$here/.venv-nipoppy}"
# nipoppy 0.4.8 and what it imports that the project venv lacks (with their own small dependencies).
pins="nipoppy==0.4.8 boutiques==0.5.33 pybids==0.22.0 formulaic==1.2.2 interface-meta==2.0.1 wrapt==2.5.2
bids-validator==1.14.7.post0 bidsschematools==2.0.1 num2words==0.5.14 docopt==0.6.2 frozendict==2.5.1
pysqa==1.1.1 defusedxml==0.7.1 rich-click==1.9.9 httpx==0.28.1 httpcore==1.0.9 json5==0.17.3
jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
attrs==26.1.0 termcolor==3.3.0"

layered_venv_start "$target" "$pins" neuroflow-nipoppy-venv
# shellcheck disable=SC2086
"${pip[@]}" install --quiet --no-deps $pins
# Prove it imports (a missing dependency fails here, not in the middle of a test).
"$target/bin/python" -c 'import nipoppy.cli.cli, nipoppy.tabular.curation_status, nipoppy.tabular.processing_status'
layered_venv_done "$target" "$pins"
