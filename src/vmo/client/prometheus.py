"""An async client of Prometheus's HTTP API (``/api/v1``): instant and range queries, label
values, series and health, over HTTPS with basic auth or a bearer token.

``vmo top``, the API server's ``metrics.k8s.io`` and the DRS balancer read VMO's metrics
(docs/monitoring.md) through it. The exception tree::

    PrometheusError
    ├── PrometheusNotConfigured   no prometheus.json in the home (``vmo up`` writes it)
    ├── PrometheusUnavailable     no answer: refused, TLS, timeout, 401/403, a non-API reply
    └── PrometheusQueryError      the server's own refusal, with its errorType and error
"""

from __future__ import annotations

import json
import logging
import math
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from vmo.home import StateDir

log = logging.getLogger(__name__)

__all__ = [
    "PROMETHEUS_FILE",
    "PrometheusClient",
    "PrometheusConfig",
    "PrometheusError",
    "PrometheusNotConfigured",
    "PrometheusQueryError",
    "PrometheusUnavailable",
    "Sample",
    "Series",
    "go_duration",
    "label_matcher",
    "prometheus_file",
]

PROMETHEUS_FILE = "prometheus.json"  # under the home's monitoring/
DEFAULT_TIMEOUT = 10.0
Timestamp = float | datetime


def prometheus_file(state: StateDir) -> Path:
    """Where ``vmo up`` records how to reach the Prometheus it started."""
    return state.monitoring / PROMETHEUS_FILE


# --- errors ------------------------------------------------------------------------------------


class PrometheusError(Exception):
    """Anything that kept a Prometheus query from being answered."""


class PrometheusNotConfigured(PrometheusError):
    """No Prometheus is configured: the file that names it is absent."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"Prometheus is not configured: {path} does not exist")
        self.path = path


class PrometheusUnavailable(PrometheusError):
    """Prometheus did not answer the API: connection, TLS, timeout, authentication or a reply
    that is not the API's JSON."""

    def __init__(self, url: str, why: str) -> None:
        super().__init__(f"Prometheus at {url} is unavailable: {why}")
        self.url = url
        self.why = why


class PrometheusQueryError(PrometheusError):
    """Prometheus refused the query; ``error_type`` is its ``errorType`` (``bad_data``,
    ``execution``, ``timeout``, ``canceled``, ``unavailable``, ``internal``)."""

    def __init__(self, expr: str, error_type: str, error: str, *, code: int = 0) -> None:
        super().__init__(f"{error_type}: {error} (query: {expr})")
        self.expr = expr
        self.error_type = error_type
        self.error = error
        self.code = code


# --- configuration -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PrometheusConfig:
    """How to reach one Prometheus: its URL, the CA its certificate is checked against, and
    basic-auth credentials or a bearer token (both optional)."""

    url: str
    ca_file: str = ""
    username: str = ""
    password: str = field(default="", repr=False)
    bearer_token: str = field(default="", repr=False)
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def from_file(cls, path: Path | str) -> PrometheusConfig:
        """Reads ``prometheus.json`` (``{"url", "ca_file", "username", "password"}``, and
        optionally ``bearer_token``); PrometheusNotConfigured when it is absent."""
        chosen = Path(path)
        try:
            raw = json.loads(chosen.read_text())
        except FileNotFoundError:
            raise PrometheusNotConfigured(chosen) from None
        except (OSError, ValueError) as exc:
            raise PrometheusError(f"{chosen}: {exc}") from exc
        if not isinstance(raw, dict) or not isinstance(raw.get("url"), str) or not raw["url"]:
            raise PrometheusError(f"{chosen}: no url")
        return cls(
            url=raw["url"],
            ca_file=str(raw.get("ca_file") or ""),
            username=str(raw.get("username") or ""),
            password=str(raw.get("password") or ""),
            bearer_token=str(raw.get("bearer_token") or ""),
        )

    @classmethod
    def from_home(cls, state: StateDir) -> PrometheusConfig:
        """The Prometheus ``vmo up`` started for the home (``monitoring/prometheus.json``)."""
        return cls.from_file(prometheus_file(state))

    def headers(self) -> dict[str, str]:
        """The Authorization header: the bearer token when there is one, else basic auth."""
        if self.bearer_token:
            return {"Authorization": f"Bearer {self.bearer_token}"}
        if self.username:
            return {"Authorization": aiohttp.encode_basic_auth(self.username, self.password)}
        return {}

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.url.startswith("https"):
            return False
        return ssl.create_default_context(cafile=self.ca_file or None)


# --- results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One value of an instant query: a vector element, or a scalar (no labels)."""

    labels: Mapping[str, str]
    timestamp: float
    value: float

    @property
    def metric(self) -> str:
        return self.labels.get("__name__", "")


@dataclass(frozen=True)
class Series:
    """One series of a range query: its labels and (timestamp, value) points in time order."""

    labels: Mapping[str, str]
    points: Sequence[tuple[float, float]]


def _value(pair: Sequence[Any]) -> tuple[float, float]:
    return float(pair[0]), float(pair[1])  # "NaN", "+Inf" and "-Inf" parse as floats


def _samples(expr: str, data: Mapping[str, Any]) -> list[Sample]:
    kind, result = data.get("resultType"), data.get("result") or []
    if kind == "vector":
        return [Sample(dict(item.get("metric") or {}), *_value(item["value"])) for item in result]
    if kind == "scalar":
        return [Sample({}, *_value(result))]
    raise PrometheusQueryError(expr, "bad_data", f"an instant query of {kind} is not supported")


def _series(expr: str, data: Mapping[str, Any]) -> list[Series]:
    kind, result = data.get("resultType"), data.get("result") or []
    if kind != "matrix":
        raise PrometheusQueryError(expr, "bad_data", f"a range query answered {kind}")
    return [
        Series(dict(item.get("metric") or {}), [_value(p) for p in item.get("values") or []])
        for item in result
    ]


def _stamp(when: Timestamp) -> str:
    seconds = when.timestamp() if isinstance(when, datetime) else float(when)
    return f"{seconds:.3f}"


def go_duration(seconds: float) -> str:
    """A duration as Go's ``time.Duration.String`` and Prometheus's step parser read it."""
    if seconds <= 0 or math.isnan(seconds):
        return "0s"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    frac = seconds - whole
    sec_text = f"{secs + frac:.3f}".rstrip("0").rstrip(".") if frac else str(secs)
    if hours:
        return f"{hours}h{minutes}m{sec_text}s"
    if minutes:
        return f"{minutes}m{sec_text}s"
    return f"{sec_text}s"


def label_matcher(name: str, value: str, op: str = "=") -> str:
    """``name="value"`` with the value quoted as PromQL string literals are (a namespace or VM
    name can never break out of the selector)."""
    return f"{name}{op}{json.dumps(value)}"


# --- the client --------------------------------------------------------------------------------


class PrometheusClient:
    """Async client of one Prometheus. Use as ``async with PrometheusClient(config) as p: ...``."""

    def __init__(self, config: PrometheusConfig) -> None:
        self.config = config
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self.config.headers(),
                connector=aiohttp.TCPConnector(ssl=self.config.ssl_context()),
                timeout=aiohttp.ClientTimeout(total=self.config.timeout),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> PrometheusClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _url(self, path: str) -> str:
        return self.config.url.rstrip("/") + path

    # --- queries -------------------------------------------------------------------------------

    async def query(self, expr: str, time: Timestamp | None = None) -> list[Sample]:
        """An instant query: the vector's samples, or one unlabelled sample for a scalar."""
        form = {"query": expr}
        if time is not None:
            form["time"] = _stamp(time)
        return _samples(expr, await self._api("/api/v1/query", form, expr))

    async def query_range(
        self, expr: str, start: Timestamp, end: Timestamp, step: float
    ) -> list[Series]:
        """A range query from ``start`` to ``end`` every ``step`` seconds."""
        form = {"query": expr, "start": _stamp(start), "end": _stamp(end), "step": f"{step:g}"}
        return _series(expr, await self._api("/api/v1/query_range", form, expr))

    async def label_values(self, label: str, *, match: Sequence[str] = ()) -> list[str]:
        """The values ``label`` takes, over the series that match any of ``match``."""
        params = [("match[]", m) for m in match]
        data = await self._api(f"/api/v1/label/{label}/values", params, label, method="GET")
        return [str(v) for v in data]

    async def series(self, match: Sequence[str]) -> list[dict[str, str]]:
        """The label sets of the series that match any of ``match``."""
        data = await self._api("/api/v1/series", [("match[]", m) for m in match], " ".join(match))
        return [dict(item) for item in data]

    async def healthy(self) -> bool:
        """True when Prometheus answers ``/-/ready`` with 200 (authenticated, within the
        timeout)."""
        try:
            async with self.session.get(self._url("/-/ready")) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False

    async def _api(
        self,
        path: str,
        form: Mapping[str, str] | Sequence[tuple[str, str]],
        expr: str,
        *,
        method: str = "POST",
    ) -> Any:
        """Sends a form (POSTed where the API allows it: long queries do not fit a URL) and
        returns the API's ``data``."""
        url = self._url(path)
        sent: dict[str, Any] = {"data": form} if method == "POST" else {"params": form}
        try:
            async with self.session.request(method, url, **sent) as resp:
                raw = await resp.read()
                code = resp.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise PrometheusUnavailable(self.config.url, str(exc) or type(exc).__name__) from exc
        if code in (401, 403):
            raise PrometheusUnavailable(self.config.url, f"{code}: the credentials were refused")
        try:
            body = json.loads(raw)
        except ValueError:
            raise PrometheusUnavailable(
                self.config.url, f"{code}: not an API answer: {raw[:200].decode(errors='replace')}"
            ) from None
        if not isinstance(body, dict):
            raise PrometheusUnavailable(self.config.url, f"{code}: not an API answer")
        if body.get("status") != "success":
            error_type, error = str(body.get("errorType", "")), str(body.get("error", ""))
            raise PrometheusQueryError(expr, error_type or f"http {code}", error, code=code)
        for warning in body.get("warnings") or []:
            log.warning("prometheus: %s (query: %s)", warning, expr)
        return body.get("data")
