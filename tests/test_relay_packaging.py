"""The relay's twistd plugin is found however twistmail is installed: the built wheel (installed
offline into a fresh virtualenv) ships it, ``twistd --help`` lists it, ``twistd -n twistmail
--help`` and ``twistmail serve --help`` run; the editable install's ``twistmail serve`` finds it
in the source tree from any working directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RELAY_OPTIONS = ("--smtp", "--queue", "--submission", "--allow-from", "--max-age")
# How many directories serve's plugin lookup adds to twisted.plugins.__path__ (called twice).
_ADDED = (
    "import twisted.plugins; from twistmail.cli import add_plugin_directory; "
    "n = len(twisted.plugins.__path__); add_plugin_directory(); add_plugin_directory(); "
    "print(len(twisted.plugins.__path__) - n)"
)
_SKIP = shutil.ignore_patterns(
    ".venv", ".bench-venv", ".bench-cache", ".git", "__pycache__", "*.egg-info", "build", "dist"
)


def _run(*argv: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, f"{argv}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project built as a wheel from a copy of the tree (the tree stays clean)."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "src"
    shutil.copytree(ROOT, source, ignore=_SKIP)
    out = base / "dist"
    _run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "--disable-pip-version-check",
        "-w",
        out,
        source,
        cwd=base,
    )
    (built,) = out.glob("twistmail-*.whl")
    return built


def test_the_wheel_holds_the_plugin_without_an_init_under_twisted(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/twistmail_plugin.py" in names
    assert "twistmail/relay/tap.py" in names
    # The API's description and the status page's templates are read from the package.
    assert "twistmail/relay/openapi.json" in names
    assert {"base.html", "login.html", "status.html"} <= {
        n.rsplit("/", 1)[1] for n in names if n.startswith("twistmail/relay/templates/")
    }
    assert not [n for n in names if n.startswith("twisted/") and n.endswith("__init__.py")]


def test_twistd_lists_and_runs_the_plugin_from_a_fresh_virtualenv(
    wheel: Path, tmp_path: Path
) -> None:
    python, site = _fresh_venv(tmp_path)
    _run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "--no-deps",
        "--no-index",
        "--disable-pip-version-check",
        wheel,
        cwd=tmp_path,
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = _run(python, "-c", "import twistmail; print(twistmail.__file__)", cwd=tmp_path, env=env)
    assert where.startswith(str(site)), where  # the wheel's copy, not the work tree's
    twistd: list[str | Path] = [python, "-c", "from twisted.scripts.twistd import run; run()"]
    listing = _run(*twistd, "--help", cwd=tmp_path, env=env)
    assert "twistmail" in listing
    assert "A durable local mail relay" in listing
    help_text = _run(*twistd, "-n", "twistmail", "--help", cwd=tmp_path, env=env)
    for option in RELAY_OPTIONS:
        assert option in help_text
    # twistmail serve finds the same plugin.
    serve_help = _run(python, "-m", "twistmail", "serve", "--help", cwd=tmp_path, env=env)
    for option in RELAY_OPTIONS:
        assert option in serve_help
    # The wheel's plugin is in Twisted's own plugin directory: serve adds no second entry.
    added = _run(python, "-c", _ADDED, cwd=tmp_path, env=env)
    assert added.strip() == "0", added
    # The plugin cache twistd may write goes to the wheel's plugin directory, not elsewhere.
    assert (site / "twisted" / "plugins" / "twistmail_plugin.py").exists()


def _fresh_venv(tmp_path: Path) -> tuple[Path, Path]:
    """A virtualenv without pip that sees the project environment's packages (Twisted and the
    rest) but not its twistmail: ``(python, site-packages)``."""
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            text=True,
        ).strip()
    )
    # A plain path line in a .pth does not run that environment's own .pth lines (its
    # editable twistmail) in this one.
    (site / "project-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python, site


def test_serve_finds_the_plugin_of_a_default_editable_install_from_another_directory(
    tmp_path: Path,
) -> None:
    # `pip install -e .` (setuptools' default mode) imports twistmail through a finder: the
    # source tree is not on sys.path, so Twisted's own scan of sys.path for twisted/plugins
    # directories misses the plugin beside the package. `twistmail serve` adds it.
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=_SKIP)
    python, _ = _fresh_venv(tmp_path)
    _run(
        sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
        "--no-build-isolation", "--no-index", "--disable-pip-version-check", "-e", source,
        cwd=tmp_path,
    )  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = _run(
        python, "-c", "import twistmail; print(twistmail.__file__)", cwd=elsewhere, env=env
    )
    assert where.startswith(str(source)), where
    help_text = _run(python, "-m", "twistmail", "serve", "--help", cwd=elsewhere, env=env)
    for option in RELAY_OPTIONS:
        assert option in help_text
    added = _run(python, "-c", _ADDED, cwd=elsewhere, env=env)
    assert added.strip() == "1", added  # the source tree's twisted/plugins, once


def test_the_project_environment_runs_twistd_with_the_plugin_from_any_directory(
    tmp_path: Path,
) -> None:
    # scripts/test puts the tree's root on sys.path beside its editable install
    # (scripts/_env.sh), so the README's `twistd -n twistmail ...` works in .venv as after a
    # wheel install.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = _run(sys.executable, "-c", "import twistmail; print(twistmail.__file__)",
                 cwd=tmp_path, env=env)  # fmt: skip
    if not where.startswith(str(ROOT)):
        pytest.skip(f"twistmail is not installed from {ROOT} here ({where.strip()})")
    twistd = Path(sys.executable).parent / "twistd"
    listing = _run(twistd, "--help", cwd=tmp_path, env=env)
    assert "A durable local mail relay" in listing
    help_text = _run(twistd, "-n", "twistmail", "--help", cwd=tmp_path, env=env)
    for option in RELAY_OPTIONS:
        assert option in help_text
    added = _run(sys.executable, "-c", _ADDED, cwd=tmp_path, env=env)
    assert added.strip() == "0", added  # Twisted's scan found it: serve adds nothing
