# Shared set-up for .ci/demo and .ci/test (sourced). Idempotent: installs only what is missing.
# Works as root on a fresh Debian 12 with Python 3.11; no stdin needed.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

_apt_updated=0
apt_install() {  # apt_install PACKAGE...: install the Debian packages given
  if [ "$_apt_updated" = 0 ]; then apt-get update -qq; _apt_updated=1; fi
  apt-get install -y -qq "$@" >/dev/null
}

need_debian() {  # need_debian COMMAND PACKAGE: install PACKAGE when COMMAND is missing
  command -v "$1" >/dev/null 2>&1 || { echo "setup: installing $2 (for $1)"; apt_install "$2"; }
}

setup_python() {  # setup_python EXTRAS: a venv in .venv with purged installed (editable) plus EXTRAS
  local py="${PYTHON:-python3}"
  if [ ! -x .venv/bin/python ]; then
    if ! "$py" -m venv .venv 2>/dev/null; then
      rm -rf .venv
      apt_install python3-venv
      "$py" -m venv .venv
    fi
  fi
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".${1:-}" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import purged" # fail loudly if the install did not work
}
