# Sourced by scripts/serve, scripts/test and scripts/lock (the latter two set
# venv_extras=test first): make .venv hold exactly the locked set of
# requirements/runtime.txt (or requirements/test.txt), with the project
# installed in editable mode. .venv is made anew whenever that lock file changes.
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

lock_digest() { sha256sum < "$root/requirements/$1.txt" | cut -c1-16; }
want="${extras:-runtime}-$(lock_digest "${extras:-runtime}")"
have="$(cat "$venv/.locked" 2>/dev/null || true)"
# The test set holds the runtime set at the same versions: serve may use it.
if [ "$have" != "$want" ] && ! { [ -z "$extras" ] && [ "$have" = "test-$(lock_digest test)" ]; }; then
  echo "Installing videoconsult${extras:+ with [$extras]} into a new .venv from requirements/${extras:-runtime}.txt (first run takes a minute) ..." >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  log="$venv/install.log"
  # pip's output goes to a log, shown only when the installation fails. Every
  # package comes from the lock, checked against its hashes; the project is
  # built with the locked setuptools, not one fetched for the build.
  if ! { "$venv/bin/python" -m pip install --require-hashes --no-deps \
           -r "$root/requirements/${extras:-runtime}.txt" \
      && "$venv/bin/python" -m pip install --no-deps --no-build-isolation -e "$root"; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "Installing into .venv failed; the output above is also in $log" >&2
    exit 1
  fi
  echo "$want" >"$venv/.locked"
fi
if [ "$(python3 "$root/scripts/lock_inputs.py" "$root")" != \
     "$(sed -n 's/^# inputs-sha256: //p' "$root/requirements/runtime.txt")" ]; then
  echo "warning: pyproject.toml or requirements/*.in changed since requirements/ was locked;" \
       ".venv holds the old lock. Run ./scripts/lock, then commit both." >&2
fi
