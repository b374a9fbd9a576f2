# Sourced by scripts/tool-parsers-venv.sh and scripts/nipoppy-venv.sh: a small venv layered on the
# project venv (.venv). A .pth file makes the project's packages importable, read-only; the caller
# then installs, --no-deps and pinned, only what its tools need and the project lacks (every pin
# given: no resolver run, the slow part of a pip install, and no clash with the project's pins).
# Idempotent: a stamp holding the pins makes a second call return at once.
#
#   layered_venv_start TARGET PINS LOCK_NAME   # prints TARGET and exits 0 if already built;
#                                              # else (re)creates it, sets project_python and pip
#   layered_venv_done TARGET PINS              # writes the stamp, says how long it took, prints TARGET

layered_venv_start() {
  local target="$1" pins="$2" lock_name="$3"
  local here
  here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  local stamp="$target/.ready"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$pins" ]; then echo "$target"; exit 0; fi
  project_python="${PROJECT_VENV:-$here/.venv}/bin/python"
  if [ ! -x "$project_python" ]; then
    echo "error: project venv not found at ${PROJECT_VENV:-$here/.venv} (run make install first)" >&2
    exit 3
  fi
  # One builder at a time (two test processes may ask at once).
  exec 9>"${TMPDIR:-/tmp}/$lock_name.lock"
  if command -v flock >/dev/null 2>&1; then flock 9; fi
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$pins" ]; then echo "$target"; exit 0; fi
  layered_venv_started=$(date +%s)
  rm -rf "$target"
  "$project_python" -m venv --without-pip "$target"
  _site_of "$project_python" > "$(_site_of "$target/bin/python")/neuroflow-project-venv.pth"
  # The project's pip installs into the new venv (--python): no second copy of pip.
  pip=("$project_python" -m pip --python "$target/bin/python" --disable-pip-version-check --no-input)
}

layered_venv_done() {
  local target="$1" pins="$2"
  echo "$pins" > "$target/.ready"
  echo "built $target in $(( $(date +%s) - layered_venv_started )) s, $(du -sh "$target" | cut -f1)" >&2
  echo "$target"
}

_site_of() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
