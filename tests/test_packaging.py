"""What ``pip install`` gives users: lower bounds on every dependency (and the minimum-versions job's
constraints made from them), a ``[keras]`` extra that pulls neither torch nor TensorFlow, the TensorFlow
build chosen per platform, and a wheel that ships ``py.typed``."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli comes with the [dev] extra
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
EXTRAS = PROJECT["optional-dependencies"]
PLATFORMS = {  # (sys_platform, platform_machine) -> the TensorFlow distribution [tensorflow] must pick
    ("linux", "x86_64"): "tensorflow-cpu", ("win32", "AMD64"): "tensorflow-cpu",
    ("darwin", "arm64"): "tensorflow", ("darwin", "x86_64"): "tensorflow", ("linux", "aarch64"): "tensorflow",
}


def load_min_constraints():
    spec = importlib.util.spec_from_file_location("min_constraints", REPO / ".ci" / "min_constraints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_dependency_has_a_lower_bound_and_the_min_constraints_pin_it():
    pins = load_min_constraints().minimum_constraints(REPO / "pyproject.toml")
    pinned = {Requirement(line).name.lower() for line in pins}
    for text in PROJECT["dependencies"] + [r for extra in EXTRAS.values() for r in extra]:
        requirement = Requirement(text)
        if requirement.name == PROJECT["name"]:
            continue
        assert any(spec.operator == ">=" for spec in requirement.specifier), f"{text} has no lower bound"
        assert requirement.name.lower() in pinned
    assert "websockets==15.0" in pins  # 13.x and 14.x kill the notification thread (proxy= TypeError)
    assert all("==" in line for line in pins)


def test_keras_extra_is_keras_alone_and_tensorflow_is_chosen_per_platform():
    names = {Requirement(text).name for text in EXTRAS["keras"]}
    assert names == {"keras", "safetensors"}
    tensorflow = [Requirement(text) for text in EXTRAS["tensorflow"]]
    for (system, machine), wanted in PLATFORMS.items():
        environment = {"sys_platform": system, "platform_machine": machine}
        picked = [r.name for r in tensorflow if r.marker is None or r.marker.evaluate(environment)]
        assert picked == [PROJECT["name"], wanted], (system, machine, picked)
    everything = Requirement(EXTRAS["all"][0]).extras
    assert {"lightning", "keras", "tensorflow", "server", "simulate", "dev"} <= everything
    assert not Marker("sys_platform == 'win32'").evaluate({"sys_platform": "linux"})  # sanity of the helper


@pytest.mark.slow
def test_pip_install_keras_extra_pulls_no_torch_and_no_tensorflow(tmp_path):
    """pip's own resolver, as a user would run it (nothing installed: --dry-run, --ignore-installed)."""
    report = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                             "--no-build-isolation", "--report", str(report), f"{REPO}[keras]"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert {"keras", "numpy", "requests", "websockets", "safetensors"} <= names
    assert not {name for name in names if name.startswith(("torch", "tensorflow", "jax", "lightning"))}, names


@pytest.mark.slow
def test_the_wheel_ships_py_typed_and_declares_the_extras(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                             "--wheel-dir", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    [wheel] = tmp_path.glob("branchkey_integrations-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert "branchkey_integrations/py.typed" in archive.namelist()
        metadata = next(archive.read(n).decode() for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
    for extra in ("keras", "tensorflow", "lightning", "server", "simulate", "all"):
        assert f"Provides-Extra: {extra}\n" in metadata
    assert "Requires-Dist: websockets>=15.0\n" in metadata


def test_every_extra_a_user_is_told_about_is_in_all():
    everything = Requirement(EXTRAS["all"][0]).extras
    assert {"docs", "notebooks"} <= everything and "branchkey-integrations[docs]" in EXTRAS["dev"]
    assert {Requirement(text).name for text in EXTRAS["notebooks"]} == {"jupyterlab", "nbconvert"}
    assert {"build", "twine"} <= {Requirement(text).name for text in EXTRAS["dev"]}


@pytest.mark.slow
def test_the_wheel_and_the_sdist_build_and_pass_twine_check(tmp_path):
    """What a release uploads: ``python -m build`` (setuptools from this environment: no download) makes both,
    and ``twine check`` finds their metadata and the README (the long description) fit for PyPI."""
    result = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path), str(REPO)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [wheel] = tmp_path.glob("branchkey_integrations-*.whl")
    [sdist] = tmp_path.glob("branchkey_integrations-*.tar.gz")
    check = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and check.stdout.count("PASSED") == 2, check.stdout + check.stderr
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert {"branchkey_integrations/py.typed", "branchkey_integrations/server/static/index.html"} <= set(names)
