"""The relay's twistd plugin ships in the built wheel: built and installed offline into a fresh
virtualenv (not editable), ``twistd --help`` lists it and ``twistd -n twistmail --help`` runs.
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
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            text=True,
        ).strip()
    )
    # The project environment's packages (Twisted and the rest) without its editable
    # twistmail: a plain path line in a .pth does not run that environment's own .pth hooks.
    (site / "project-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
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
    twistd = [python, "-c", "from twisted.scripts.twistd import run; run()"]
    listing = _run(*twistd, "--help", cwd=tmp_path, env=env)
    assert "twistmail" in listing
    assert "A durable local mail relay" in listing
    help_text = _run(*twistd, "-n", "twistmail", "--help", cwd=tmp_path, env=env)
    for option in ("--smtp", "--queue", "--submission", "--allow-from", "--max-age"):
        assert option in help_text
    # The plugin cache twistd may write goes to the wheel's plugin directory, not elsewhere.
    assert (site / "twisted" / "plugins" / "twistmail_plugin.py").exists()
