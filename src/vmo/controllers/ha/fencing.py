"""How a failed node is fenced: asked to power off, then confirmed off.

- ``RedfishFencer``: ``POST …/Actions/ComputerSystem.Reset {"ResetType": "ForceOff"}`` on the
  node's BMC, then ``GET`` its ComputerSystem until ``PowerState`` is ``Off``.
- ``OutOfServiceFencer``: Kubernetes' ``node.kubernetes.io/out-of-service`` NoExecute taint.
  The taint is the confirmation (a remediation operator or an administrator adds it once the
  node is off); with a confirmation annotation configured, this controller adds the taint
  itself once the annotation is on the Node.

Every failure is a ``FenceError`` carrying what was tried; the caller never releases a VM on
anything but a confirmed Off.
"""

from __future__ import annotations

import base64
import binascii
import ssl
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from vmo.client import NODE, SECRET, ApiStatusError, Client
from vmo.controllers.ha.crds import OUT_OF_SERVICE_TAINT, FencingMethod
from vmo.runtime import timestamp

JSON = dict[str, Any]

REQUEST_TIMEOUT = 10.0
DEFAULT_SECRET_NAMESPACE = "vmo-system"
OUT_OF_SERVICE_VALUE = "nodeshutdown"


class FenceError(Exception):
    """Fencing could not be requested or confirmed; the message says what was tried."""


class Fencer(Protocol):
    async def request_off(self) -> None:
        """Asks for the node to be powered off (idempotent)."""

    async def confirmed_off(self) -> bool:
        """Whether the node is certainly off now."""


# --- Redfish -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RedfishTarget:
    """One node's ComputerSystem on its BMC, and how to reach it."""

    url: str
    username: str
    password: str
    ssl: ssl.SSLContext | bool

    def headers(self) -> dict[str, str]:
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}


def _decoded(secret: JSON, key: str) -> str | None:
    value = (secret.get("data") or {}).get(key)
    if value is None:
        plain = (secret.get("stringData") or {}).get(key)
        return None if plain is None else str(plain)
    try:
        return base64.b64decode(value).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None


async def redfish_target(client: Client, node: str, spec: JSON) -> RedfishTarget:
    """The node's target from the policy's ``fencing.redfish`` and its credentials Secret."""
    ref = spec.get("credentialsSecret") or {}
    namespace = str(ref.get("namespace") or DEFAULT_SECRET_NAMESPACE)
    name = str(ref.get("name") or "")
    try:
        secret = await client.find(SECRET, name, namespace)
    except ApiStatusError as exc:
        raise FenceError(f"Secret {namespace}/{name} not read: {exc}") from None
    if secret is None:
        raise FenceError(f"the BMC credentials Secret {namespace}/{name} does not exist")
    username, password = _decoded(secret, "username"), _decoded(secret, "password")
    if not username or password is None:
        raise FenceError(f"Secret {namespace}/{name} lacks 'username' or 'password'")
    template = str(spec.get("address") or _decoded(secret, "address") or "")
    if not template:
        raise FenceError(
            f"no BMC address: neither the policy nor Secret {namespace}/{name} gives one"
        )
    context: ssl.SSLContext | bool
    if spec.get("insecureSkipVerify"):
        context = False
    else:
        ca = _decoded(secret, str(spec.get("caBundleKey") or "ca.crt"))
        try:
            context = ssl.create_default_context(cadata=ca) if ca else ssl.create_default_context()
        except ssl.SSLError as exc:
            raise FenceError(f"the CA in Secret {namespace}/{name} is not usable: {exc}") from None
    url = template.replace("{node}", node)
    return RedfishTarget(url, username, password, context)


class RedfishFencer:
    """ForceOff through the node's BMC; Off once its ComputerSystem's PowerState says so."""

    def __init__(self, target: RedfishTarget, *, timeout: float = REQUEST_TIMEOUT) -> None:
        self.target = target
        self.timeout = aiohttp.ClientTimeout(total=timeout)

    async def _call(self, method: str, url: str, body: JSON | None = None) -> JSON | None:
        try:
            async with (
                aiohttp.ClientSession(
                    timeout=self.timeout, headers=self.target.headers()
                ) as session,
                session.request(method, url, json=body, ssl=self.target.ssl) as resp,
            ):
                text = await resp.text()
                if resp.status >= 300:
                    raise FenceError(f"{method} {url}: HTTP {resp.status}: {text[:300]}")
                if not text:
                    return None
                found: JSON = await resp.json(content_type=None)
                return found
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            raise FenceError(f"{method} {url}: {type(exc).__name__}: {exc}") from None

    async def request_off(self) -> None:
        url = f"{self.target.url}/Actions/ComputerSystem.Reset"
        await self._call("POST", url, {"ResetType": "ForceOff"})

    async def power_state(self) -> str:
        system = await self._call("GET", self.target.url) or {}
        return str(system.get("PowerState") or "")

    async def confirmed_off(self) -> bool:
        return await self.power_state() == "Off"


# --- Kubernetes' out-of-service taint -------------------------------------------------------------


def has_out_of_service_taint(node: JSON) -> bool:
    return any(
        t.get("key") == OUT_OF_SERVICE_TAINT and t.get("effect") == "NoExecute"
        for t in (node.get("spec") or {}).get("taints") or []
    )


def out_of_service_taint() -> JSON:
    return {
        "key": OUT_OF_SERVICE_TAINT,
        "value": OUT_OF_SERVICE_VALUE,
        "effect": "NoExecute",
        "timeAdded": timestamp(),
    }


class OutOfServiceFencer:
    """The out-of-service taint confirms; a confirmation annotation makes this add it."""

    def __init__(self, client: Client, node: str, spec: JSON) -> None:
        self.client = client
        self.node = node
        self.annotation = str(spec.get("confirmationAnnotation") or "")
        self.added = False  # whether this fencer put the taint on

    async def request_off(self) -> None:
        return None  # the node's remediation (outside VMO) powers it off

    async def confirmed_off(self) -> bool:
        try:
            node = await self.client.get(NODE, self.node)
            if has_out_of_service_taint(node):
                return True
            annotations = node["metadata"].get("annotations") or {}
            if not self.annotation or self.annotation not in annotations:
                return False
            taints = [*((node.get("spec") or {}).get("taints") or []), out_of_service_taint()]
            guard = {"resourceVersion": node["metadata"].get("resourceVersion")}
            await self.client.patch(
                NODE, self.node, {"metadata": guard, "spec": {"taints": taints}}
            )
        except ApiStatusError as exc:
            raise FenceError(
                f"node {self.node}: out-of-service taint not read or added: {exc}"
            ) from None
        self.added = True
        return True


async def remove_out_of_service_taint(client: Client, node: JSON) -> None:
    """Takes the taint off a returned node (as an administrator would once it is healthy)."""
    taints = [
        t
        for t in (node.get("spec") or {}).get("taints") or []
        if t.get("key") != OUT_OF_SERVICE_TAINT
    ]
    guard = {"resourceVersion": node["metadata"].get("resourceVersion")}
    patch = {"metadata": guard, "spec": {"taints": taints or None}}
    await client.patch(NODE, node["metadata"]["name"], patch)


async def fencer_for(client: Client, node: str, policy: JSON) -> Fencer:
    """The fencer the policy's ``fencing`` names; FenceError when it cannot be built."""
    fencing = (policy.get("spec") or {}).get("fencing") or {}
    method = fencing.get("method")
    if method == FencingMethod.REDFISH:
        return RedfishFencer(await redfish_target(client, node, fencing.get("redfish") or {}))
    if method == FencingMethod.OUT_OF_SERVICE_TAINT:
        return OutOfServiceFencer(client, node, fencing.get("outOfServiceTaint") or {})
    raise FenceError(f"unknown fencing method {method!r}")


__all__ = [
    "FenceError",
    "Fencer",
    "OutOfServiceFencer",
    "RedfishFencer",
    "RedfishTarget",
    "fencer_for",
    "has_out_of_service_taint",
    "redfish_target",
    "remove_out_of_service_taint",
]
