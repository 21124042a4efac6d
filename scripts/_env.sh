# Sourced by scripts/*: create or update the project's virtualenv from its own files.
# Sets VENV. Quiet unless something fails.
VENV="${TWISTMAIL_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
stamp="$VENV/.twistmail-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
    # The editable install imports twistmail through a finder, which Twisted's plugin scan (of
    # sys.path for twisted/plugins directories) never sees. A .pth line with the tree's root
    # puts twisted/plugins/twistmail_plugin.py on that path, so `twistd -n twistmail` (the
    # README's relay commands) works in this environment from any directory, as after a wheel
    # install. (setuptools' "compat" editable mode did the same, and is being removed.)
    "$VENV/bin/python" -c 'import pathlib, sys, sysconfig
pathlib.Path(sysconfig.get_paths()["purelib"], "twistmail-source-tree.pth").write_text(
    sys.argv[1] + "\n")' "$PWD"
    touch "$stamp"
fi
