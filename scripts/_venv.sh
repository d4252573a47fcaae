# Sourced by scripts/serve and scripts/test (the latter sets
# venv_extras=test first): make .venv and install the
# project into it, once per change of pyproject.toml.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
extras="${venv_extras:-}"

if ! command -v python3 >/dev/null; then
  echo "videoconsult needs python3 (3.11 or newer)" >&2
  exit 1
fi
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "videoconsult needs Python 3.11 or newer; python3 is $(python3 --version)" >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "Creating the virtual environment in .venv ..." >&2
  python3 -m venv "$venv"
fi
hash="$(sha256sum < "$root/pyproject.toml" | cut -c1-16)"
stamp="$venv/.installed-$hash${extras:+-$extras}"
# The test extras include everything serve needs.
[ -z "$extras" ] && [ -f "$stamp-test" ] && stamp="$stamp-test"
if [ ! -f "$stamp" ]; then
  echo "Installing videoconsult${extras:+ with [$extras]} into .venv (first run takes a minute) ..." >&2
  log="$venv/install.log"
  # pip's output goes to a log, shown only when the installation fails.
  if ! { "$venv/bin/python" -m pip install --upgrade pip \
      && "$venv/bin/python" -m pip install -e "$root${extras:+[$extras]}"; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "Installing into .venv failed; the output above is also in $log" >&2
    exit 1
  fi
  # Stamps of an older pyproject.toml are stale; those of this one stay.
  find "$venv" -maxdepth 1 -name '.installed-*' ! -name ".installed-$hash*" -delete
  touch "$stamp"
fi
