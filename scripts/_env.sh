# Sourced by scripts/*: create or update the project's virtualenv from its own files.
# Sets VENV. Quiet unless something fails.
VENV="${TWISTMAIL_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
stamp="$VENV/.twistmail-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
    # editable_mode=compat puts the source tree itself on sys.path (a .pth line), where
    # Twisted's plugin scan finds twisted/plugins/twistmail_plugin.py: so `twistd -n twistmail`
    # (the README's relay commands) works in this environment from any directory, as it does
    # after a wheel install. The default editable mode imports twistmail through a finder that
    # Twisted's plugin scan never sees.
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
        -e '.[test]' --config-settings editable_mode=compat
    touch "$stamp"
fi
