#!/usr/bin/env bash
# ksmlab launcher.
#   ./run.sh              set up .venv (first time) and run the default scenario
#   ./run.sh test [ARGS]  set up .venv and run the whole test suite (ARGS go to pytest)
#   ./run.sh ARGS...      anything else goes to the `ksmlab` command line
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
venv="$here/.venv"
py="${PYTHON:-python3}"

setup() {
    if [ ! -x "$venv/bin/python" ]; then
        echo "ksmlab: creating $venv" >&2
        "$py" -m venv "$venv"
    fi
    # Reinstall only when the project definition changed since the last install.
    stamp="$venv/.ksmlab-installed"
    sum="$(sha256sum pyproject.toml | cut -d' ' -f1)"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$sum" ]; then
        echo "ksmlab: installing ksmlab and its test tools into $venv" >&2
        "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]" >&2
        echo "$sum" > "$stamp"
    fi
    # Byte-compile the packages, as pip does for an installed one: every actor, fork
    # server and campaign run is an interpreter start, and with PYTHONDONTWRITEBYTECODE
    # set each would compile them from source again (0.2 s of a 0.5 s start). Only
    # changed files are compiled; Python still checks each .pyc against its source.
    "$venv/bin/python" -m compileall -q -j 0 actors shared_mem protocol ksmlab >/dev/null || true
}

setup
case "${1:-}" in
    test)
        shift
        # Sweep anything a killed earlier run left behind, then run every test.
        "$venv/bin/ksmlab" sweep >/dev/null || true
        rc=0
        "$venv/bin/python" -m pytest "$@" || rc=$?
        "$venv/bin/ksmlab" sweep || true
        exit "$rc"
        ;;
    "")
        exec "$venv/bin/ksmlab" run
        ;;
    *)
        exec "$venv/bin/ksmlab" "$@"
        ;;
esac
