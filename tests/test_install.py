"""Installs beyond the editable one: a wheel carries what `workbench demo` and the notebooks read, and `make lab`
serves JupyterLab with the workbench extension (`make_lab` is also how the browser test starts its server)."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["pyproject.toml", "README.md", "LICENSE", "workbench", "kernels", "data"]  # what a wheel is built from
MAKE = shutil.which("make")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def make_lab(log: Path, token: str, lab_dir: Path | None = None, env: dict | None = None) -> Iterator[str]:
    """`make lab` on a free localhost port with this interpreter (PY=, the .venv setup skipped with -o), serving
    `lab_dir` (default: the Makefile's, notebooks/) and never reaching the network; yields its URL once it answers.
    Its output goes to `log`."""
    if MAKE is None:
        pytest.skip("no make")
    port = free_port()
    args = ["--no-browser", "--allow-root", "--ip=127.0.0.1", "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={token}", "--LabApp.news_url=",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    command = [MAKE, "-s", "-C", str(ROOT), "-o", ".venv/.installed-lab", "lab", f"PY={sys.executable}",
               f"PORT={port}", "LAB_ARGS=" + " ".join(args)] + ([f"LAB_DIR={lab_dir}"] if lab_dir else [])
    env = {k: v for k, v in (env or os.environ).items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            for _ in range(240):
                try:
                    urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                    break
                except OSError:
                    if server.poll() is not None:
                        raise RuntimeError("make lab exited:\n" + log.read_text()) from None
                    time.sleep(0.5)
            else:
                raise TimeoutError("make lab did not answer in 2 minutes:\n" + log.read_text())
            yield url
        finally:
            os.killpg(server.pid, signal.SIGTERM)  # make passes it on and waits for jupyter lab to stop
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def test_wheel_carries_what_the_demo_reads(tmp_path):
    """A regular install, a wheel unpacked into a bare folder, runs `workbench demo` from another folder: the wheel
    holds the embedded model and every held-out split, and no training split."""
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.zarr", ".train", "kernels")  # workbench/kernels: a dev symlink
    for name in SOURCES:  # a clean copy, so that a stale build/ of the checkout cannot leak into the wheel
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=ignore)
        else:
            shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    out = subprocess.run(pip + ["wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index", "-w",
                                str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    model = {f"workbench/_data/models/wb-v4-mini/{n}" for n in ("config.json", "model.safetensors", "tokenizer.json")}
    heldout = {f"workbench/_data/corpus/{p.name}" for p in (ROOT / "data" / "corpus").glob("*.heldout.txt")}
    assert len(heldout) == 7 and model | heldout <= names
    # every package of the source, and the widgets' JavaScript (a package left out of pyproject.toml's list
    # works in an editable install and is missing from the wheel)
    packages = {p.relative_to(src).as_posix() for p in (src / "workbench").rglob("__init__.py")}
    packages.add("workbench/kernels/__init__.py")
    assert len(packages) >= 7 and packages | {"workbench/widgets/figure.js"} <= names, packages - names
    assert not [n for n in names if n.endswith(".train.txt")]

    site = tmp_path / "site"
    out = subprocess.run(pip + ["install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # one torch thread: on a busy machine more threads make the run up to 10x slower
    out = subprocess.run([sys.executable, "-m", "workbench", "demo", "--max-bytes", "2048", "--out", "x.html"],
                         cwd=elsewhere, env={**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert f"model   {(site / 'workbench' / '_data' / 'models' / 'wb-v4-mini').resolve()}\n" in out.stdout
    assert "Plotly.newPlot" in (elsewhere / "x.html").read_text()


def test_make_lab_needs_no_test_extras():
    """`make lab` sets up .venv with JupyterLab and the extension, not the dev extras."""
    if MAKE is None:
        pytest.skip("no make")
    recipe = subprocess.run([MAKE, "-n", "-B", "--no-print-directory", "-C", str(ROOT), "lab"],
                            capture_output=True, text=True, check=True).stdout
    assert '-e ".[lab]"' in recipe and "./extensions/jupyterlab" in recipe and ".[dev]" not in recipe
    assert recipe.rstrip().splitlines()[-1].startswith(".venv/bin/python -m jupyterlab --ServerApp.root_dir=")


def test_make_lab_serves_the_notebooks_with_the_extension(tmp_path):
    """`make lab` answers with notebooks/ in its file browser and the workbench extension in its page."""
    pytest.importorskip("jupyterlab")
    token = "workbench-test"
    with make_lab(tmp_path / "jupyter.log", token) as url:
        files = urllib.request.urlopen(f"{url}/api/contents?token={token}", timeout=30).read().decode()
        page = urllib.request.urlopen(f"{url}/lab?token={token}", timeout=30).read().decode()
    assert '"01_quickstart.ipynb"' in files  # notebooks/, the Makefile's LAB_DIR
    assert "moe-workbench-jupyterlab" in page  # the extension, in the page's federated_extensions
