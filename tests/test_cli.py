"""``branchkey-local`` as a user runs it: the installed console script in a subprocess (--version, options
after the subcommand, defaults in --help, BRANCHKEY_DATA_DIR, status --json, a closed pipe, exit codes, a
missing extra, the one-server-per-data-directory lock), and the parser's rules in-process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from branchkey_integrations import __version__
from branchkey_integrations.cli import DATA_DIR_ENV, build_parser
from branchkey_integrations.server.lock import FileLock
from branchkey_integrations.server.store import DB_NAME

from .conftest import wait_until

SCRIPT = Path(sys.executable).with_name("branchkey-local.exe" if os.name == "nt" else "branchkey-local")


def branchkey_local(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != DATA_DIR_ENV}
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env={**environment, **(env or {})})


def init(data_dir: Path, leaves: int = 2) -> None:
    result = branchkey_local("init", "--data-dir", str(data_dir), "--leaves", str(leaves),
                             "--credentials-dir", str(data_dir.parent / "credentials"))
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------- in-process parser rules
def test_common_options_work_before_and_after_the_subcommand():
    parser = build_parser()
    assert parser.parse_args(["status", "--data-dir", "d"]).log_level == "INFO"
    assert parser.parse_args(["--log-level", "ERROR", "status", "--data-dir", "d"]).log_level == "ERROR"
    assert parser.parse_args(["status", "--data-dir", "d", "--log-level", "DEBUG"]).log_level == "DEBUG"
    assert parser.parse_args(["--log-level", "ERROR", "serve", "--log-level", "WARNING", "--data-dir", "d"]).log_level == "WARNING"


def test_data_dir_defaults_to_the_environment_variable(monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, "from-env")
    assert build_parser().parse_args(["status"]).data_dir == "from-env"
    assert build_parser().parse_args(["status", "--data-dir", "given"]).data_dir == "given"
    monkeypatch.delenv(DATA_DIR_ENV)
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["status"])
    assert exit_info.value.code == 2


def test_help_shows_every_real_default(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 127.0.0.1)", "(default: 8080)", "(default: INFO)", f"(default: ${DATA_DIR_ENV}, unset)"):
        assert shown in text
    assert "(default: None)" not in text
    with pytest.raises(SystemExit):
        build_parser().parse_args(["simulate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: lightning)", "(default: 3)", "(default: 0.5)", "(default: branchkey-simulation)"):
        assert shown in text


def test_the_lock_admits_one_holder_and_frees_on_release(tmp_path):
    first, second = FileLock(tmp_path / "server.lock"), FileLock(tmp_path / "server.lock")
    assert first.acquire()
    assert not second.acquire()
    first.release()
    assert second.acquire()
    second.release()


# ---------------------------------------------------------------------------- the installed command
@pytest.mark.slow
def test_version_and_usage_errors_exit_2_runtime_failures_exit_1(tmp_path):
    version = branchkey_local("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"branchkey-local {__version__}"
    for args, message in [(["init", "--data-dir", str(tmp_path / "d"), "--leaves", "0", "--credentials-dir", "c"],
                           "expected an integer >= 1"),
                          (["launch"], "invalid choice"), (["status"], "--data-dir")]:
        result = branchkey_local(*args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
    missing = branchkey_local("status", "--data-dir", str(tmp_path / "empty"))
    assert missing.returncode == 1, missing.stderr
    assert missing.stderr.strip() == (f"branchkey-local status: {tmp_path / 'empty'} holds no branchkey-local store; "
                                      "create one with 'branchkey-local init'.")


@pytest.mark.slow
def test_environment_data_dir_options_after_the_subcommand_and_status_json(tmp_path):
    data_dir = tmp_path / "data"
    env = {DATA_DIR_ENV: str(data_dir)}
    created = branchkey_local("init", "--leaves", "3", "--min-leaves", "2", "--credentials-dir", str(tmp_path / "c"),
                              "--log-level", "WARNING", env=env)
    assert created.returncode == 0, created.stderr
    assert (data_dir / DB_NAME).exists()
    status = branchkey_local("status", "--json", "--log-level", "ERROR", env=env)
    assert status.returncode == 0, status.stderr
    document = json.loads(status.stdout)
    leaf = json.loads((tmp_path / "c" / "leaf_1.json").read_text())
    assert document["server"] is None
    [branch] = document["branches"]
    assert (branch["id"], branch["name"], branch["run_status"], branch["leaves"], branch["required_uploads"]) == (
        leaf["branch_id"], "main", "start", 3, 2)
    assert branch["rounds"] == [{"round": 1, "run_number": 1, "round_index": 0, "status": "open", "upload_count": 0,
                                 "aggregate_id": None, "strategy": None, "strategy_note": None}]
    assert (branch["strategy"], branch["strategy_params"]) == ("fedavg", {})


@pytest.mark.slow
def test_a_closed_pipe_is_not_an_error(tmp_path):
    init(tmp_path / "data")
    # The reader is gone before the command writes a byte: every write meets EPIPE.
    process = subprocess.Popen([str(SCRIPT), "status", "--data-dir", str(tmp_path / "data")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0 and stderr.decode() == ""
    # ... and the way users meet it
    shell = subprocess.run(["bash", "-c", f"set -o pipefail; '{SCRIPT}' status --json --data-dir "
                                          f"'{tmp_path / 'data'}' | head -1"], capture_output=True, text=True, timeout=60)
    assert shell.returncode == 0 and shell.stdout == "{\n" and "Traceback" not in shell.stderr, shell.stderr


@pytest.mark.slow
def test_serve_refuses_a_data_dir_another_process_serves(tmp_path):
    data_dir = tmp_path / "data"
    init(data_dir)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "from branchkey_integrations.server.lock import FileLock\n"
                               f"lock = FileLock({str(data_dir / 'server.lock')!r})\nassert lock.acquire()\n"
                               "print('locked', flush=True)\nsys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        refused = branchkey_local("serve", "--data-dir", str(data_dir), "--port", "0")
        assert refused.returncode == 1
        assert f"another branchkey-local server already serves {data_dir.resolve()}" in refused.stderr
        assert "Traceback" not in refused.stderr
    finally:
        holder.send_signal(signal.SIGKILL)  # kill -9: the operating system drops the lock with the process
        holder.wait(10)
    lock = FileLock(data_dir / "server.lock")
    assert wait_until(lock.acquire, 10, "the killed holder's lock to be free")
    lock.release()


@pytest.mark.slow
@pytest.mark.parametrize("command, module, extra", [("serve", "aiohttp", "server"), ("simulate", "sklearn", "simulate")])
def test_a_missing_extra_is_named(tmp_path, command, module, extra):
    args = [command, "--data-dir", str(tmp_path)] if command == "serve" else [command, "--output", str(tmp_path)]
    code = (f"import sys; sys.modules[{module!r}] = None  # as if not installed\n"
            f"from branchkey_integrations.cli import main\nsys.exit(main({args!r}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert f'branchkey-integrations[{extra}]' in result.stderr and module in result.stderr
    assert "Traceback" not in result.stderr
