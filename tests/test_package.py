"""The package surface: importing it needs no ML framework, and the public names are deliberate."""

import subprocess
import sys

import pytest

import branchkey_integrations
import branchkey_integrations.core


def test_import_needs_neither_torch_nor_tensorflow_nor_keras():
    code = ("import sys, branchkey_integrations, branchkey_integrations.core.wire; "
            "print(sorted(m for m in ('torch', 'tensorflow', 'keras', 'lightning', 'aiohttp') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_names():
    """The top level holds what a leaf's code uses; the server's and the simulation's errors have their own homes."""
    import warnings

    import branchkey_integrations.server
    import branchkey_integrations.simulation
    from branchkey_integrations.core import errors

    assert set(branchkey_integrations.__all__) == {"__version__", *branchkey_integrations.core.__all__}
    leaf = {"AnalyticsResult", "AnalyticsError", "AnalyticsRoundMissedError", "Client", "ClientOptions", "Credentials", "DownloadBuffer", "Federation", "LeafOptions", "Notification",
            "Outcome", "RoundResult", "UploadReceipt", "WaitProgress", "BranchKeyError", "CredentialsError",
            "WeightingError", "ArchiveError", "ArchiveTooLargeError", "AggregateMismatchError", "TransportError",
            "DownloadTimeoutError", "ProtocolError", "ApiError", "AuthenticationError", "PermissionDeniedError",
            "NotFoundError", "RequestRejectedError", "ServerError", "InsufficientStorageError", "NotificationError",
            "RunBlockedError", "RunStopped", "AggregationTimeoutError", "RoundInterrupted"}
    server = {"LocalServerError", "RecordNotFoundError", "InvalidValueError", "RunNotStartedError", "RoundClosedError",
              "RoundInProgressError", "AggregationError", "BrokerError", "BrokerArgumentError", "StorageFullError",
              "UploadInterruptedError", "QuotaExceededError", "TlsConfigError",
              "LeafRevokedError", "DeltaBaseError"}
    simulation = {"SimulationError", "EmbeddedServerError", "PartitionError", "LeafFailedError", "SimulationTerminated"}
    assert set(branchkey_integrations.core.__all__) == leaf == {*errors.LEAF_ERRORS, *leaf - set(errors.__all__)}
    assert set(branchkey_integrations.server.__all__) == {"Store", "create_app", *server}
    assert set(branchkey_integrations.simulation.__all__) == simulation
    assert set(errors.__all__) <= leaf | server | simulation
    for name in leaf:
        assert getattr(branchkey_integrations, name) is getattr(branchkey_integrations.core, name)
    for module, names in ((branchkey_integrations.server, server), (branchkey_integrations.simulation, simulation)):
        for name in names:
            assert getattr(module, name) is getattr(errors, name)
            with pytest.warns(DeprecationWarning, match=f"import it from {module.__name__}"):
                assert getattr(branchkey_integrations, name) is getattr(errors, name)  # the old place still works
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert branchkey_integrations.Federation is branchkey_integrations.core.federation.Federation
    with pytest.raises(AttributeError):
        branchkey_integrations.NoSuchThing  # noqa: B018
    all_errors = leaf | server | simulation
    assert all(issubclass(getattr(errors, n), errors.BranchKeyError)
               for n in all_errors if n.endswith(("Error", "Stopped", "Terminated")) and n != "BranchKeyError")


def test_every_error_class_has_one_home():
    """No module defines an exception class of its own: the tree lives in core.errors only."""
    import pathlib
    import re

    package = pathlib.Path(branchkey_integrations.__file__).parent
    defined = {path.relative_to(package).as_posix(): re.findall(r"^class (\w+)\((?:[\w.]*Error|Exception)", path.read_text(), re.M)
               for path in package.rglob("*.py")}
    elsewhere = {path: names for path, names in defined.items() if names and path != "core/errors.py"}
    # two boundary signals that never leave their module: an HTTP answer and a CLI exit
    assert elsewhere == {"server/httpio.py": ["HttpProblem"], "cli/failures.py": ["CliError"]}


def test_every_error_survives_pickling_with_its_details():
    import pickle

    error = pickle.loads(pickle.dumps(branchkey_integrations.RequestRejectedError("bad upload", 400)))
    assert type(error) is branchkey_integrations.RequestRejectedError
    assert (error.message, error.status_code, str(error)) == ("bad upload", 400, "bad upload (HTTP 400)")
    plain = pickle.loads(pickle.dumps(branchkey_integrations.RunBlockedError("paused")))
    assert str(plain) == "paused"
