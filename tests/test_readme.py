"""Every ``python`` and ``bash`` block of README.md and of the documentation site (``docs/**/*.md``) runs as
written.

Each block is listed in ``HOW`` by its first line, with how this test runs it; a new block that is not
listed fails :func:`test_every_readme_block_is_run_here`, so neither the README nor a guide can grow an
untested snippet. A block may appear in several files (the README's quickstarts are copies of the guides'
first blocks): each way runs one code, and every copy must be that code, character for character.

- A block for a leaf runs as three real leaf processes against a fresh three-leaf branch that the README's
  own ``init`` and ``serve`` commands make (``--port 8080``, as written), because a round completes when
  every leaf of the branch has uploaded. Leaf k runs the block with ``leaf_1.json`` replaced by
  ``leaf_k.json`` (the README says: one script per leaf, each with its own credentials file). What the
  prose says the reader already has (``model``, ``datamodule``, ``x_train``, ...) is made by ``SETUP``, a
  tiny model on random data, and ``CHECK`` then asserts what the block promises (rounds completed).
- The simulation commands run as written, in a temporary directory.
- Install commands (``install``) are checked by :func:`test_every_install_line_works_from_a_clone`: each names
  the package as the clone (``-e ".[extras]"``, from the repository root) with extras that exist, never by a name
  no index has; ``.ci/setup`` installs ``.[all]`` for real. The site's build command (``docs-build``) runs in
  tests/docs/test_site.py, with its own output directory.
- Blocks run elsewhere: ``# 1.`` and ``# 2.`` by ``.ci/run`` (verbatim), the fast lane is a subset of this very
  suite, the contributors' strategy and codec examples run in tests/server/test_strategy_plugin.py and
  tests/core/test_codecs.py, and the build of the wheel and sdist in tests/test_packaging.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from .conftest import REPO, wait_until

README = REPO / "README.md"
#: every page whose blocks must run: the README and the documentation site's markdown
PAGES = [README, *sorted((REPO / "docs").rglob("*.md"))]
NOTEBOOKS = sorted((REPO / "examples" / "notebooks").glob("*.ipynb"))
BIN = Path(sys.executable).parent
PORT_URL = "http://127.0.0.1:8080"
LEAVES = 3

_LIGHTNING = """
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import lightning.pytorch as pl

torch.manual_seed(0)

class TinyModel(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 2)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

class TinyData(pl.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,))), batch_size=8)

model, datamodule = TinyModel(), TinyData()
"""
_KERAS = """
import numpy as np
import keras

rng = np.random.default_rng(0)
x_train, y_train = rng.normal(size=(32, 4)).astype("float32"), rng.integers(0, 2, 32)
x_val, y_val = x_train[:8], y_train[:8]
x, y = x_train, y_train
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
"""
SETUP = {
    "lightning": _LIGHTNING,
    "keras": _KERAS,
    "keras-monitor": _KERAS + "from branchkey_integrations.keras import BranchKeyKerasCallback\n",
    "client": "import numpy as np\nw, b = np.ones((4, 2), np.float32), np.zeros(2, np.float32)\n",
    "analytics": "",
    "overview": _LIGHTNING.replace("model, datamodule", "lightning_model, datamodule") + _KERAS + (
        "from lightning.pytorch import Trainer\n"
        "from branchkey_integrations.lightning import BranchKeyCallback\n"
        "from branchkey_integrations.keras import BranchKeyKerasCallback\n"
        f"URL = {PORT_URL!r}\n"),
}
CHECK = {
    "lightning": 'assert trainer.callback_metrics["branchkey/round"] == 20, trainer.callback_metrics\n',
    "keras": 'assert history.history["branchkey_round"] == [float(n) for n in range(1, 21)], history.history\n',
    "keras-monitor": 'assert callback.round >= 1 and "branchkey_test_loss" in model.history.history\n',
    "client": "assert [a.shape for a in aggregate.layers] == [(4, 2), (2,)]\nassert aggregation_id\n",
    "analytics": 'assert result.statistics["age"].count == 1500 and result.round_index == 0, result\n',
    "overview": 'assert model.history.history["branchkey_round"] == [1.0] and len(trainer.callbacks) >= 1\n',
}
# first line of a block -> how it runs: a SETUP key (three leaves), "branch", "simulate", or a reason it runs elsewhere
HOW = {
    "# 1. Set up and run the main job": "elsewhere: .ci/run runs the commands of # 1. and # 2. verbatim",
    'python3 -m venv .venv && .venv/bin/pip install "torch==2.13.0" -e ".[lightning,simulate]"': "install",
    '.venv/bin/pip install -e ".[tensorflow,simulate]"': "install",
    '.venv/bin/pip install -e ".[docs]" && .venv/bin/mkdocs build': "docs-build",
    ".venv/bin/python -m build --outdir dist": "elsewhere: tests/test_packaging.py builds both and runs twine check; "
                                               "tests/docs/test_site.py runs mkdocs build --strict",
    "trainer = Trainer(callbacks=[BranchKeyCallback(": "overview",
    "branchkey-local simulate --framework keras": "simulate",
    "# A strategy in one file": "elsewhere: tests/server/test_strategy_plugin.py runs it through the real server",
    "branchkey-local init --data-dir bk-data --leaves 3 --credentials-dir credentials": "branch",
    "from lightning.pytorch import Trainer": "lightning",
    "from branchkey_integrations.keras import BranchKeyKerasCallback": "keras",
    "import keras": "keras",
    "callback = BranchKeyKerasCallback(": "keras-monitor",
    "from branchkey_integrations import Client": "client",
    "from branchkey_integrations import Federation": "analytics",
    '.venv/bin/python -m pytest -m "not slow"': "elsewhere: the fast lane is a subset of this suite",
    "from branchkey_integrations.core.tensor_codecs import Codec": "elsewhere: tests/core/test_codecs.py runs it",
}


def readme_blocks() -> list[tuple[str, str, str]]:
    """(page:line, language, code) of every python and bash block of the README and the docs."""
    blocks = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in re.finditer(r"^```(python|bash)\n(.*?)^```", text, re.M | re.S):
            where = f"{page.relative_to(REPO).as_posix()}:{text.count(chr(10), 0, m.start()) + 1}"
            blocks.append((where, m.group(1), m.group(2)))
    return blocks


def how(code: str) -> str | None:
    first = code.strip().splitlines()[0]
    return next((way for start, way in HOW.items() if first.startswith(start)), None)


def blocks_run_as(way: str) -> list[str]:
    """The distinct codes of the blocks that run as ``way`` (copies of one block count once)."""
    return list(dict.fromkeys(code for _, _, code in readme_blocks() if how(code) == way))


def test_every_readme_block_is_run_here():
    unknown = [f"{where}: {code.splitlines()[0]}" for where, _, code in readme_blocks() if how(code) is None]
    assert not unknown, f"add these blocks to tests/test_readme.py HOW (and make them run): {unknown}"
    ways = {how(c) for _, _, c in readme_blocks()}
    assert {"branch", "simulate", "lightning", "keras", "keras-monitor", "client", "overview", "analytics",
            "install", "docs-build"} <= ways
    for way in ways - {"install"}:
        if not way.startswith("elsewhere"):
            copies = [where for where, _, code in readme_blocks() if how(code) == way]
            assert len(blocks_run_as(way)) == 1, f"blocks {copies} run as {way} but differ: make them copies"
    readme = {how(code) for where, _, code in readme_blocks() if where.startswith("README.md:")}
    assert {"lightning", "keras", "branch", "simulate"} <= readme, "the README lost a quickstart block"


#: ``pip install`` followed by its arguments, in a block, in prose (`...`) or in a notebook's JSON string
PIP_INSTALL = re.compile(r"pip install ([^`\n&;)]+)")


def install_lines() -> list[tuple[str, str]]:
    """(where, arguments) of every ``pip install`` a reader is told to run: README, docs, notebooks."""
    found = []
    for page in [*PAGES, *NOTEBOOKS]:
        text = page.read_text(encoding="utf-8")
        if page.suffix == ".ipynb":  # its cells' text, line for line as a reader sees them
            text = "\n".join("".join(cell["source"]) for cell in json.loads(text)["cells"])
        for m in PIP_INSTALL.finditer(text):
            found.append((f"{page.relative_to(REPO).as_posix()}:{text.count(chr(10), 0, m.start()) + 1}",
                          m.group(1).split("#")[0].strip().strip('"').strip()))
    return found


def test_every_install_line_works_from_a_clone():
    """No index has the package yet: every install names it as the clone (``.`` or ``-e .``, from the repository
    root), with extras that exist; anything else installed is named with a version or plainly (torch)."""
    from packaging.requirements import Requirement

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    lines = install_lines()
    assert len(lines) >= 10 and any(where.endswith(".ipynb") or ".ipynb:" in where for where, _ in lines)
    for where, arguments in lines:
        assert "branchkey-integrations" not in arguments, f"{where}: pip install {arguments} (not on any index)"
        for target in re.findall(r'"[^"]*"|\'[^\']*\'|\S+', arguments):
            target = target.strip('"\'')
            if target.startswith("-"):
                assert target in ("-e", "-U", "-q"), f"{where}: pip install {arguments}: option {target}"
            elif target.startswith("."):
                match = re.fullmatch(r"\.(?:\[([a-z,]+)\])?", target)
                assert match, f"{where}: pip install {arguments}: {target} is not the clone with extras"
                unknown = set((match.group(1) or "").split(",")) - extras - {""}
                assert not unknown, f"{where}: pip install {arguments}: no extra {sorted(unknown)} in pyproject.toml"
            else:
                Requirement(target)  # a plain requirement (torch, torch==2.13.0): parses


def test_the_readme_names_no_missing_extra_or_stale_module():
    text = "\n".join(page.read_text(encoding="utf-8") for page in PAGES)
    assert "branchkey_integrations.server.cli" not in text  # the CLI is branchkey_integrations.cli
    assert '".[keras,simulate]"' not in text  # [keras] alone has no backend: [tensorflow,simulate]


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "TF_CPP_MIN_LOG_LEVEL": "2"}


def start_branch(workdir: Path) -> subprocess.Popen:
    """Run the README's init + serve block as written in ``workdir``; serve stays up."""
    [block] = blocks_run_as("branch")
    init_line, serve_line = [line for line in block.strip().splitlines() if line.strip()]
    subprocess.run(["bash", "-c", init_line], cwd=workdir, env=_env(), check=True, timeout=120, capture_output=True)
    log = open(workdir / "serve.log", "wb")
    server = subprocess.Popen(["bash", "-c", f"exec {serve_line}"], cwd=workdir, env=_env(), stdout=log,
                              stderr=subprocess.STDOUT)

    def up() -> bool:
        assert server.poll() is None, (workdir / "serve.log").read_text()
        try:
            return requests.get(f"{PORT_URL}/api/v1/run/none", timeout=2).status_code < 500
        except requests.ConnectionError:
            return False

    wait_until(up, 60, "the README's branchkey-local serve on port 8080")
    return server


def run_leaves(way: str, workdir: Path) -> None:
    blocks = blocks_run_as(way)
    assert blocks, f"no README block runs as {way}"
    assert len(blocks) == 1, f"{len(blocks)} README blocks run as {way}; give each its own SETUP and CHECK"
    code = blocks[0]
    server = start_branch(workdir)
    try:
        processes = []
        for k in range(1, LEAVES + 1):
            leaf_dir = workdir / f"leaf_{k}"
            leaf_dir.mkdir()
            (leaf_dir / "credentials").symlink_to(workdir / "credentials")
            for credentials in (workdir / "credentials").glob("*.json"):
                (leaf_dir / credentials.name).symlink_to(credentials)
            script = leaf_dir / "leaf.py"
            script.write_text(SETUP[way] + "\n# --- README.md, as written\n" + code.replace("leaf_1.json", f"leaf_{k}.json")
                              + "\n# --- what the block promises\n" + CHECK[way], encoding="utf-8")
            log = open(leaf_dir / "leaf.log", "wb")
            processes.append(subprocess.Popen([sys.executable, str(script)], cwd=leaf_dir, env=_env(), stdout=log,
                                              stderr=subprocess.STDOUT))
            log.close()
        for k, process in enumerate(processes, 1):
            try:
                code_k = process.wait(timeout=300)
            except subprocess.TimeoutExpired:
                code_k = None
            log_text = (workdir / f"leaf_{k}" / "leaf.log").read_text(errors="replace")
            assert code_k == 0, f"leaf {k} running the README's {way} block exited {code_k}:\n{log_text[-4000:]}"
    finally:
        for process in locals().get("processes", []):
            if process.poll() is None:
                process.kill()
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0, (workdir / "serve.log").read_text()[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("way", ["lightning", "keras", "keras-monitor", "client", "overview", "analytics"])
def test_a_readme_block_runs_as_three_leaves_of_a_branch(way, tmp_path):
    if way == "keras-monitor" and not blocks_run_as(way):
        pytest.fail("the README lost its block that monitors branchkey_test_loss")
    run_leaves(way, tmp_path)


@pytest.mark.slow
def test_the_readme_simulation_commands_run_as_written(tmp_path):
    [block] = blocks_run_as("simulate")
    for line in [line for line in block.strip().splitlines() if line.strip()]:
        result = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, f"{line}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    for output in ("branchkey-simulation", "non-iid"):
        report = json.loads((tmp_path / output / "report.json").read_text())
        assert report and (tmp_path / output / "accuracy.png").stat().st_size > 0
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_the_readmes_links_lead_to_files_of_the_repository():
    """The README is read on a code host, outside the site: its relative links must name files that exist
    (the site's own links are checked by ``mkdocs build --strict``, tests/docs)."""
    text = README.read_text(encoding="utf-8")
    targets = [m.group(1) for m in re.finditer(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)]
    local = [target for target in targets if not re.match(r"https?:", target)]
    assert len(local) >= 10 and any(target.startswith("docs/guides/") for target in local)
    assert not [target for target in local if not (REPO / target).exists()]
    assert len(text.splitlines()) <= 250, "the README is the front page: move details into docs/"
