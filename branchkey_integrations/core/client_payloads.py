"""What a leaf's client writes and reads besides the protocol calls: the payloads, as the official client names them.

:class:`PayloadCalls` is the part of :class:`~.client.Client` that makes archives and reads results, with the
official 3.0.1 client's names, arguments and rules: ``save_weights`` (a model), ``save_fields`` (named values
the caller computed, each combined by the operation its branch configures) and ``save_analytics`` (raw columns
reduced here to their six-entry bundles, :func:`~.analytics.reduce_column`, so raw values never leave the
site), each writing an ``.npz`` that ``file_upload`` sends; the same without a file (``upload_fields``,
``upload_analytics``: one retried, idempotent upload, as a model's); ``wait_for_analytics``, the wait for that
upload's analytics aggregate (a model's never ends it); and ``download_analytics``, an analytics aggregate read
as an :class:`~.analytics_result.AnalyticsResult`. Differences from 3.0.1, on purpose: typed
errors (:class:`~.errors.AnalyticsError`, :class:`~.errors.ArchiveError`) instead of bare ``Exception``, and
``save_fields(kind="federated_learning")`` is refused, since named entries are not a model archive (3.0.1 writes
one that its own upload check then refuses).

Why a class of its own: it needs of the client only its public calls (the upload of an encoded archive, the
download of an aggregate, its waiter and round view), which :class:`~.client.Client` provides; this keeps the
client to its protocol calls.

Example (skipped: it needs a running branchkey-local and credentials; tests/integration runs it):
    >>> from branchkey_integrations import Client
    >>> with Client("leaf_1.json", host="http://127.0.0.1:8080") as client:  # doctest: +SKIP
    ...     path = client.save_analytics({"age": ages}, nan_policy="omit")
    ...     client.file_upload(path)
    ...     result = client.download_analytics(client.wait_for_analytics(timeout=600))
"""

from __future__ import annotations

import os
import time
from typing import Any, BinaryIO, Iterable, Mapping, Sequence
from urllib.parse import urlsplit

import numpy as np

from . import wire
from .analytics import check_nan_policy, reduce_columns
from .analytics_result import AnalyticsResult
from .errors import AggregationTimeoutError, AnalyticsError
from .progress import RoundView, UploadReceipt
from .protocol import KIND_FEDERATED_ANALYTICS, KIND_FEDERATED_LEARNING, PAYLOAD_KINDS
from .transfer import DownloadBuffer, upload_compression
from .waiter import Every, RoundWaiter
from .watch import find_missed_aggregate


def npz_path(file_path: str | os.PathLike) -> str:
    """``file_path`` with ``.npz`` appended when missing, as the official client names its files.

    >>> npz_path("fields"), npz_path("model.npz")
    ('fields.npz', 'model.npz')
    """
    path = str(file_path)
    return path if path.endswith(".npz") else path + ".npz"


def analytics_entries(columns: Mapping[str, object] | None, fields: Mapping[str, object] | None,
                      nan_policy: str = "omit") -> dict[str, Any]:
    """One analytics payload's entries: the bundles of ``columns`` (:func:`~.analytics.reduce_columns`), then
    ``fields`` as given.

    >>> sorted(analytics_entries({"age": [1, 2]}, {"sites": 1}))
    ['age_max', 'age_min', 'age_n', 'age_nan', 'age_sum', 'age_sumsq', 'sites']

    Raises:
        AnalyticsError: neither is given, a column is refused, or a field has the name of a bundle entry.
    """
    check_nan_policy(nan_policy)
    if not columns and not fields:
        raise AnalyticsError("Nothing to send: pass columns (raw values, reduced here) or fields (values you "
                             "computed), or both.")
    entries: dict[str, Any] = reduce_columns(columns, nan_policy) if columns else {}
    for name, value in (fields or {}).items():
        if name in entries:
            raise AnalyticsError(f"Field {name!r} has the name of an entry of a column's bundle: rename the field or "
                                 "the column.")
        entries[name] = value
    return entries


class PayloadCalls:
    """The payload calls of :class:`~.client.Client` (see the module's docstring); the client provides
    :meth:`upload_encoded` and :meth:`download_aggregate`."""

    @property
    def host(self) -> str:  # the client's API host
        raise NotImplementedError

    last_upload: UploadReceipt | None  # the client's: its last upload

    @property
    def branch_id(self) -> str:  # the client's
        raise NotImplementedError

    @property
    def waiter(self) -> RoundWaiter:  # the client's: its run status and aggregation ids
        raise NotImplementedError

    @property
    def run_number(self) -> int | None:  # the client's
        raise NotImplementedError

    @property
    def run_status(self) -> str | None:  # the client's
        raise NotImplementedError

    def get_round(self, *, brief: bool = False) -> RoundView | None:  # the client's: its round view
        raise NotImplementedError

    def upload_encoded(self, archive: wire.EncodedArchive, filename: str, *, kind: str = KIND_FEDERATED_LEARNING,
                       sha256: bytes | None = None) -> UploadReceipt:
        raise NotImplementedError  # the client's: its retried, idempotent upload

    def download_aggregate(self, file_id: str, *, buffer: DownloadBuffer | None = None,
                           expected_bytes: int | None = None, timeout: float | None = None) -> wire.Archive:
        raise NotImplementedError  # the client's: its limited, checked download

    # --------------------------------------------------------------- models
    def convert_pytorch_numpy(self, model: Iterable[Any], weighting: float = 1) -> tuple[float, list[np.ndarray]]:
        """Turn ``model.named_parameters()`` into ``(weighting, [arrays])``; bf16 becomes float32."""
        params = []
        for item in model:
            tensor = item[1] if isinstance(item, tuple) else item
            tensor = tensor.detach().cpu()
            if str(tensor.dtype) == "torch.bfloat16":
                tensor = tensor.float()
            params.append(tensor.numpy())
        return weighting, params

    def save_weights(self, file_path: str | os.PathLike, weighting: float,
                     parameters: Sequence[np.ndarray], *, compression: str = "deflate") -> str:
        """Write a BranchKey NPZ (``.npz`` is appended when missing) and return its path."""
        path = npz_path(file_path)
        wire.encode(parameters, weighting, path, compression=compression)
        return path

    def validate_weight_shape(self, file: BinaryIO) -> bool:
        """Check an upload archive (of either kind) before sending it, as the official client does; rewinds ``file``."""
        wire.validate_upload(wire.decode(file))
        file.seek(0)
        return True

    # ------------------------------------------------------------ analytics
    def save_fields(self, entries: Mapping[str, object], kind: str = KIND_FEDERATED_ANALYTICS,
                    file_path: str | os.PathLike = "fields", weighting: float | None = None) -> str:
        """Write named values (a scalar becomes one element) as a ``federated_analytics`` NPZ; return its path.

        Each field is combined across leaves by the operation its branch configures for it (``sum``, ``min``,
        ``max``, ``must_match``); what is given is what is sent. ``weighting`` is read by nothing on this path
        (written as 0.0, as 3.0.1 writes it when omitted).

        Raises:
            AnalyticsError: ``kind`` is not a payload kind, or is ``"federated_learning"`` (a model is
                ``save_weights``'), or ``entries`` is not a dict.
            ArchiveError: no entries, a reserved or ``layer_<n>`` name, or a value that is not numbers or text.
        """
        if kind not in PAYLOAD_KINDS:
            raise AnalyticsError(f"Expected kind in {PAYLOAD_KINDS}. Received: kind={kind!r}")
        if kind == KIND_FEDERATED_LEARNING:
            raise AnalyticsError("kind='federated_learning' needs " + (
                "a weighting, and " if weighting is None else "") + "a model's layers, which named entries are not: "
                "write a model with save_weights(file_path, weighting, parameters).")
        if not isinstance(entries, Mapping):
            raise AnalyticsError(f"Expected entries as a dict of name -> value. Received: {type(entries).__name__}")
        archive = wire.prepare_fields(entries, compression="deflate")  # refused before a file is made
        path = npz_path(file_path)
        with open(path, "wb") as handle:
            archive.write_to(handle)
        return path

    def save_analytics(self, columns: Mapping[str, object], file_path: str | os.PathLike = "analytics",
                       nan_policy: str = "omit") -> str:
        """Reduce each raw column to its bundle (``<col>_n``, ``_sum``, ``_sumsq``, ``_min``, ``_max``, ``_nan``)
        and write those as a ``federated_analytics`` NPZ; return its path. The raw values are never written.

        ``nan_policy="omit"`` drops NaNs, counts them in ``_nan`` and warns (``UserWarning``); ``"raise"`` refuses a
        column with one. The platform combines the bundles exactly and needs no configuration for them.

        Raises:
            AnalyticsError: no columns, or a column that is not numeric, not 1-D, empty, infinite somewhere, NaN
                somewhere under ``"raise"``, or whose name cannot be a field's.
            ValueError: ``nan_policy`` is not ``"omit"`` or ``"raise"``.
        """
        return self.save_fields(reduce_columns(columns, nan_policy), file_path=file_path)

    def upload_fields(self, entries: Mapping[str, object], *, compression: str = "auto") -> UploadReceipt:
        """:meth:`save_fields` and ``file_upload`` in one step, without a file: return the :class:`UploadReceipt`
        (its ``round`` is the analytics round the upload went into, when the platform said)."""
        if not isinstance(entries, Mapping):
            raise AnalyticsError(f"Expected entries as a dict of name -> value. Received: {type(entries).__name__}")
        archive = wire.prepare_fields(entries, compression=upload_compression(compression, self.host_name))
        return self.upload_encoded(archive, "fields.npz", kind=KIND_FEDERATED_ANALYTICS)

    def upload_analytics(self, columns: Mapping[str, object], *, nan_policy: str = "omit",
                         fields: Mapping[str, object] | None = None, compression: str = "auto") -> UploadReceipt:
        """:meth:`save_analytics` and ``file_upload`` in one step, without a file; ``fields`` (values computed
        by the caller, as :meth:`save_fields` sends them) go in the same upload. Return the :class:`UploadReceipt`."""
        return self.upload_fields(analytics_entries(columns, fields, nan_policy), compression=compression)

    def wait_for_analytics(self, timeout: float | None = None, *, receipt: UploadReceipt | None = None,
                           check_every_s: float = 5.0) -> str:
        """Block until the aggregate of the analytics round of ``receipt`` (default: :attr:`last_upload`, an
        analytics upload) arrives and return its id; a model's aggregate never ends this wait. Also asked of the
        platform every ``check_every_s`` s (its round view), in case a notification was lost.

        Raises:
            AnalyticsError: no analytics upload to wait for.
            AggregationTimeoutError: none within ``timeout`` s (:class:`AnalyticsRoundMissedError`: a later
                analytics round completed without this one's aggregate arriving).
        """
        receipt = receipt or self.last_upload
        if receipt is None or receipt.kind != KIND_FEDERATED_ANALYTICS:
            raise AnalyticsError("No analytics upload to wait for: upload one first (file_upload of a save_fields or "
                                 "save_analytics file, upload_fields, upload_analytics), or pass its receipt.")
        deadline = None if timeout is None else time.monotonic() + timeout
        target = receipt.round
        safety_net = [] if target is None else [Every(check_every_s, lambda waited: find_missed_aggregate(
            self, target, KIND_FEDERATED_ANALYTICS), first=check_every_s, on_refresh=True)]
        found = self.waiter.wait_for_analytics(receipt.mark, deadline, safety_net, stopped=None, target=target)
        if found is None:
            raise AggregationTimeoutError(f"No analytics aggregate for branch {self.branch_id} within {timeout} s.")
        return found

    def download_analytics(self, file_id: str, *, timeout: float | None = None, **known: Any) -> AnalyticsResult:
        """Download an analytics aggregate and read it as an :class:`AnalyticsResult` (``known``: its
        ``run_number``, ``round_index``, ``contributors``, when the caller knows them).

        Raises:
            AnalyticsError: the aggregate is a model's (it does not declare the analytics kind).
        """
        archive = self.download_aggregate(file_id, timeout=timeout)
        return AnalyticsResult.from_archive(archive, aggregation_id=file_id, **known)

    @property
    def host_name(self) -> str:
        """The API host's name (``127.0.0.1``), which decides what ``compression="auto"`` means."""
        return urlsplit(self.host).hostname or ""


__all__ = ["PayloadCalls", "analytics_entries", "npz_path"]
