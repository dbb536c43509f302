"""The settings of :class:`~.client.Client`: their names, their defaults and the rule each value must follow.

This module owns the one validator of client settings, :func:`check_client_options`, and
:class:`ClientOptions`, the checked settings with every default written once. ``Client`` checks its
own arguments through it; :class:`~.federation.Federation` (and so both callbacks) builds its
``ClientOptions`` at construction, so a misspelt option or a negative timeout fails when it is
written, not when the first round connects, an epoch later, and the client it connects later is
made from those options without checking them again (:meth:`Client.from_options`). The API host
rule is public here too (:func:`check_host`), for every layer that takes a host.

The per-request HTTP timeout is ``request_timeout``; the old name ``timeout`` (which on a callback means
the round's wait) is still accepted, with a ``DeprecationWarning``.

Example:
    >>> check_client_options({"host": "http://127.0.0.1:8080/", "request_timeout": 5})
    {'host': 'http://127.0.0.1:8080', 'request_timeout': 5.0}
    >>> check_client_options({"request_timeout": -5})
    Traceback (most recent call last):
    ...
    ValueError: Expected request_timeout to be a number of seconds > 0. Received: request_timeout=-5
    >>> ClientOptions(transport="none").request_timeout
    30.0
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from .delta import check_delta
from .float_codecs import QUANTIZERS
from .protocol import DEFAULT_HOST
from .tensor_codecs import codec_names

DEFAULT_OUTPUT_DIR = "./aggregated_output"
TRANSPORTS = ("auto", "amqp", "websocket", "none")
AMQP_PORT, AMQPS_PORT = 5672, 5671  # RabbitMQ's plain and TLS listeners
#: the ``quantize=`` choices: None (lossless) or a lossy codec (see :mod:`.codec_choice`)
QUANTIZE = (None, *QUANTIZERS)


def check_host(host: str) -> str:
    """An API host is an http(s) URL with a host part; returned without a trailing slash."""
    parts = urlsplit(host or "") if isinstance(host, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(
            f"Expected host like 'https://app.branchkey.com' or 'http://127.0.0.1:8080'. Received: host={host!r}")
    return host.rstrip("/")


def _host(name: str, value: Any) -> str:
    return check_host(value)


def _transport(name: str, value: Any) -> str:
    if value not in TRANSPORTS:
        raise ValueError(f"Expected transport in {TRANSPORTS}. Received: transport={value!r}")
    return value


def check_compression(name: str, value: Any) -> str:
    """``value`` as a ``compression=`` choice: ``"auto"`` or a registered codec's name (see :mod:`.codec_choice`)."""
    choices = ("auto", *codec_names())
    if value not in choices:
        raise ValueError(f"Expected {name} in {choices}. Received: {name}={value!r}")
    return value


def check_quantize(name: str, value: Any) -> str | None:
    """``value`` as a ``quantize=`` choice: None or a lossy codec's name."""
    if value not in QUANTIZE:
        raise ValueError(f"Expected {name} in {QUANTIZE}. Received: {name}={value!r}")
    return value


def _download_codec(name: str, value: Any) -> str | None:
    if value is not None and (value in ("auto", "none", "stored", "deflate") or value not in codec_names()):
        raise ValueError(f"Expected {name} to be None (aggregates as stored) or one of "
                         f"{[c for c in codec_names() if c not in ('none', 'stored', 'deflate')]}. Received: {name}={value!r}")
    return value


def _port(name: str, value: Any) -> int:
    if not (isinstance(value, int) and 0 < value < 65536):
        raise ValueError(f"Expected {name} between 1 and 65535. Received: {name}={value!r}")
    return value


def check_seconds(name: str, value: Any, allow_none: bool = False) -> float:
    """``value`` as float seconds > 0 (finite, not a bool); a ValueError naming ``name`` otherwise
    (``allow_none``: the message says None is allowed, and the caller handles it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        allowed = "a number of seconds > 0" + (" or None (wait forever)" if allow_none else "")
        raise ValueError(f"Expected {name} to be {allowed}. Received: {name}={value!r}")
    return float(value)


def _seconds(name: str, value: Any) -> float:
    return check_seconds(name, value)


def _count(name: str, value: Any) -> int:
    if not (isinstance(value, int) and value >= 0):
        raise ValueError(f"Expected {name} >= 0. Received: {name}={value!r}")
    return value


def _factor(name: str, value: Any) -> float:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and value >= 0):
        raise ValueError(f"Expected {name} to be a number >= 0 (seconds of backoff). Received: {name}={value!r}")
    return float(value)


def _optional_bytes(name: str, value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"Expected {name} to be a byte count >= 1 or None (sized after the leaf's upload). "
                         f"Received: {name}={value!r}")
    return value


def _rbmq_host(name: str, value: Any) -> str | None:
    # a hostname (plain AMQP on rbmq_port, as 2.7.1 connects), or amqps://host[:port] for AMQP over TLS
    if value is None or (isinstance(value, str) and value and "://" not in value):
        return value
    parts = urlsplit(value) if isinstance(value, str) else None
    try:
        port_ok = parts is not None and (parts.port or 1) > 0
    except ValueError:
        port_ok = False
    if parts is None or parts.scheme not in ("amqp", "amqps") or not parts.hostname or not port_ok \
            or parts.username is not None or parts.path.strip("/") or parts.query:
        raise ValueError(f"Expected {name} to be a hostname, a URL like 'amqps://broker.example.org:5671' (AMQP over "
                         f"TLS; no user, vhost or query: the leaf's credentials say those) or None (the API host's). "
                         f"Received: {name}={value!r}")
    return value


def _client_cert(name: str, value: Any) -> str | tuple[str, str] | None:
    # requests' cert=: one PEM file holding the certificate and its key, or (certificate file, key file)
    if value is None:
        return None
    paths = (value,) if isinstance(value, (str, os.PathLike)) else tuple(value) if isinstance(value, (tuple, list)) \
        else ()
    if not 1 <= len(paths) <= 2 or not all(isinstance(p, (str, os.PathLike)) and os.fspath(p) for p in paths):
        raise ValueError(f"Expected {name} to be (certificate file, key file), one PEM file holding both, or None. "
                         f"Received: {name}={value!r}")
    missing = [os.fspath(p) for p in paths if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"Expected {name} to name files that exist; not found: {', '.join(missing)}. "
                         f"Received: {name}={value!r}")
    return os.fspath(paths[0]) if len(paths) == 1 else (os.fspath(paths[0]), os.fspath(paths[1]))


def _verify(name: str, value: Any) -> bool | str:
    # requests takes verify=<path of a CA bundle> as well as a bool, and the client passes ssl through
    if not isinstance(value, (bool, str)):
        raise ValueError(f"Expected {name} to be True, False or the path of a CA bundle. Received: {name}={value!r}")
    return value


def _flag(name: str, value: Any) -> Any:
    return value  # any truth value, as the official client takes it


def _proxies(name: str, value: Any) -> dict[str, str] | None:
    if value is not None and not isinstance(value, Mapping):
        raise ValueError(f"Expected {name} to be a dict like {{'https': 'http://proxy:3128'}} or None. "
                         f"Received: {name}={value!r}")
    return value if value is None else dict(value)


def _directory(name: str, value: Any) -> str | os.PathLike:
    if not isinstance(value, (str, os.PathLike)) or value == "":
        raise ValueError(f"Expected {name} to be a directory path. Received: {name}={value!r}")
    return value


#: every keyword argument of ``Client`` after ``credentials``, in signature order, with its rule
#: (a test checks this table against the signature, so a new argument cannot miss its rule)
_RULES: dict[str, Callable[[str, Any], Any]] = {
    "host": _host,
    "rbmq_host": _rbmq_host,
    "rbmq_port": _port,
    "ssl": _verify,
    "wait_for_run": _flag,
    "run_check_interval_s": _seconds,
    "proxies": _proxies,
    "transport": _transport,
    "output_dir": _directory,
    "request_timeout": _seconds,
    "max_retries": _count,
    "backoff_factor": _factor,
    "max_download_bytes": _optional_bytes,
    "download_timeout": _seconds,
    "cert": _client_cert,
    "compression": check_compression,
    "quantize": check_quantize,
    "error_feedback": _flag,
    "download_codec": _download_codec,
    "delta": check_delta,
    "timeout": _seconds,  # the old name of request_timeout: see check_client_options
}
CLIENT_OPTIONS = tuple(_RULES)


def check_client_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Check keyword arguments for ``Client`` without creating one; return them normalized.

    Names come first (one not in :data:`CLIENT_OPTIONS` raises, listing the allowed ones; ``timeout``
    becomes ``request_timeout``, with a ``DeprecationWarning``), then each value against the rule
    ``Client`` applies. Normalized means: the host without its trailing slash, seconds as floats,
    proxies as a plain dict.

    Raises:
        ValueError: naming the option and the value received, and what is expected.
    """
    named = _renamed(options)
    return {name: _RULES[name](name, value) for name, value in named.items()}


def _renamed(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with known names only (ValueError otherwise), the old ``timeout`` as ``request_timeout``."""
    unknown = [name for name in options if name not in _RULES]
    if unknown:
        received = ", ".join(f"{name}={options[name]!r}" for name in unknown)
        raise ValueError(f"Expected client options among {CLIENT_OPTIONS}. Received: {received}")
    named = dict(options)
    if named.get("timeout") is None:
        named.pop("timeout", None)
        return named
    if "request_timeout" in named:
        raise ValueError(f"Expected request_timeout or its old name timeout, not both. Received: "
                         f"request_timeout={named['request_timeout']!r}, timeout={named['timeout']!r}")
    _RULES["timeout"]("timeout", named["timeout"])  # the message names what the user wrote
    warnings.warn("The client option 'timeout' is now called 'request_timeout' (seconds for each HTTP request); "
                  "'timeout' still works but will be removed.", DeprecationWarning, stacklevel=4)
    named["request_timeout"] = named.pop("timeout")
    return named


@dataclass(frozen=True)
class ClientOptions:
    """Every setting of :class:`~.client.Client` but the credentials, checked when made (see
    :func:`check_client_options`; ``timeout``, the old name of ``request_timeout``, is not a field).
    The one place their defaults are written: ``Client``'s signature reads them from here.
    """

    host: str = DEFAULT_HOST
    rbmq_host: str | None = None
    rbmq_port: int = AMQP_PORT
    ssl: bool = True  # or the path of a CA bundle, which requests takes too
    wait_for_run: bool = False
    run_check_interval_s: float = 30.0
    proxies: dict[str, str] | None = None
    transport: str = "auto"
    output_dir: str | os.PathLike = DEFAULT_OUTPUT_DIR
    request_timeout: float = 30.0
    max_retries: int = 3
    backoff_factor: float = 0.5
    max_download_bytes: int | None = None
    download_timeout: float = 3600.0  # seconds a whole download may take when the call does not say
    cert: str | tuple[str, str] | None = None  # a client certificate for servers that ask for one (mutual TLS)
    compression: str = "auto"  # how uploads are encoded: see codec_choice (by link, and what the branch accepts)
    quantize: str | None = None  # lossy, opt-in: "fp16", "bf16" or "int8", where the branch accepts it
    error_feedback: bool = True  # with a lossy codec: what it dropped is added to the next upload
    download_codec: str | None = None  # aggregates encoded with this codec, where the branch advertises it
    delta: str | bool = "auto"  # uploads as the difference from the last aggregate, where the branch takes them

    def __post_init__(self) -> None:
        for f in fields(self):  # normalized: the host without its slash, seconds as floats
            object.__setattr__(self, f.name, _RULES[f.name](f.name, getattr(self, f.name)))

    @classmethod
    def checked(cls, options: Mapping[str, Any]) -> ClientOptions:
        """The options named in ``options`` (an unknown name raises, listing the known ones; ``timeout`` is
        accepted as ``request_timeout``, with a ``DeprecationWarning``), the rest at their defaults."""
        return cls(**_renamed(options))

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def http_settings(self) -> dict[str, Any]:
        """The keyword arguments of :class:`~.http.HttpSession` these options set."""
        return {"verify": self.ssl, "cert": self.cert, "proxies": self.proxies, "timeout": self.request_timeout,
                "max_retries": self.max_retries, "backoff_factor": self.backoff_factor}

    def amqp_endpoint(self) -> tuple[str, int, bool]:
        """``(host, port, tls)`` of the broker for AMQP notifications.

        ``rbmq_host`` a hostname (or None: the API host's): plain AMQP on ``rbmq_port``, as 2.7.1 connects.
        ``amqps://host[:port]``: TLS, verified as ``ssl`` says (True: the system's CAs; a path: that CA
        bundle), presenting ``cert`` if set; the port is the URL's, else ``rbmq_port`` if set, else 5671.

        Example:
            >>> ClientOptions(host="https://bk.example.org", rbmq_host="amqps://mq.example.org").amqp_endpoint()
            ('mq.example.org', 5671, True)
            >>> ClientOptions(host="https://bk.example.org:8443").amqp_endpoint()
            ('bk.example.org', 5672, False)
        """
        value = self.rbmq_host or urlsplit(self.host).hostname or "localhost"
        if "://" not in value:
            return value, self.rbmq_port, False
        parts = urlsplit(value)
        tls = parts.scheme == "amqps"
        default = AMQPS_PORT if tls and self.rbmq_port == AMQP_PORT else self.rbmq_port
        return str(parts.hostname), parts.port or default, tls


__all__ = ["ClientOptions", "CLIENT_OPTIONS", "DEFAULT_OUTPUT_DIR", "TRANSPORTS", "check_client_options", "check_host"]
