"""The package surface: importing it needs no ML framework, and the public names are deliberate."""

import subprocess
import sys

import branchkey_integrations
import branchkey_integrations.core


def test_import_needs_neither_torch_nor_tensorflow_nor_keras():
    code = ("import sys, branchkey_integrations, branchkey_integrations.core.wire; "
            "print(sorted(m for m in ('torch', 'tensorflow', 'keras', 'lightning', 'aiohttp') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_names():
    assert set(branchkey_integrations.__all__) == {"__version__", *branchkey_integrations.core.__all__}
    expected = {"Client", "Credentials", "DownloadBuffer", "Notification", "BranchKeyError", "CredentialsError", "ArchiveError",
                "ArchiveTooLargeError", "TransportError", "ApiError", "AuthenticationError", "PermissionDeniedError",
                "NotFoundError", "RequestRejectedError", "ServerError", "RunBlockedError", "NotificationError",
                "AggregationTimeoutError"}
    assert set(branchkey_integrations.core.__all__) == expected
    for name in expected:
        assert getattr(branchkey_integrations, name) is getattr(branchkey_integrations.core, name)
    assert all(issubclass(getattr(branchkey_integrations, n), branchkey_integrations.BranchKeyError)
               for n in expected if n.endswith("Error") and n != "BranchKeyError")


def test_every_error_survives_pickling_with_its_details():
    import pickle

    error = pickle.loads(pickle.dumps(branchkey_integrations.RequestRejectedError("bad upload", 400)))
    assert type(error) is branchkey_integrations.RequestRejectedError
    assert (error.message, error.status_code, str(error)) == ("bad upload", 400, "bad upload (HTTP 400)")
    plain = pickle.loads(pickle.dumps(branchkey_integrations.RunBlockedError("paused")))
    assert str(plain) == "paused"
