"""A disk read from a pull-mode VirtualMachineBackup's endpoints, as KubeVirt publishes them in
``status.includedVolumes[].dataEndpoint`` / ``mapEndpoint`` (with the CA in
``status.endpointCert`` and the token from ``spec.tokenSecretRef``). The same code reads a
backup of VMO's embedded engine and one of a KubeVirt 1.9 cluster: it speaks only those URLs.

The map gives the disk's size, the ranges known to be zeros (which are not read) and, for an
incremental backup, the ranges written since the checkpoint (the only ones read).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp

from vmo.controllers.backup.disk import Extent
from vmo.controllers.backup.repository import RepositoryError

TOKEN_HEADER = "x-kubevirt-export-token"
ZERO_BIT, DIRTY_BIT = 2, 1


class EndpointError(RepositoryError):
    """The backup's endpoint refused or could not be reached."""


@dataclass(frozen=True)
class MapExtent:
    offset: int
    length: int
    type: int
    description: str


class EndpointSource:
    """One volume of a pull-mode backup, as a backup ``Source``; open it with ``async with``."""

    def __init__(
        self,
        data_url: str,
        map_url: str,
        token: str,
        *,
        ca_pem: str | None = None,
        incremental: bool = False,
        timeout: float = 60.0,
    ) -> None:
        self.data_url, self.map_url, self.token = data_url, map_url, token
        self.incremental = incremental
        self.size = 0
        self.extents: list[MapExtent] = []
        context = ssl.create_default_context(cadata=ca_pem) if ca_pem else None
        self._ssl: ssl.SSLContext | bool = context if context is not None else True
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> EndpointSource:
        self._session = aiohttp.ClientSession(
            headers={TOKEN_HEADER: self.token}, timeout=self._timeout
        )
        try:
            await self._load_map()
        except BaseException:
            await self._session.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()

    async def _get(self, url: str, params: dict[str, str]) -> aiohttp.ClientResponse:
        assert self._session is not None
        try:
            resp = await self._session.get(url, params=params, ssl=self._ssl)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise EndpointError(f"backup endpoint {url}: {type(exc).__name__}: {exc}") from None
        if resp.status != 200:
            text = (await resp.text())[:300].strip()
            resp.release()
            raise EndpointError(f"backup endpoint {url}: HTTP {resp.status}: {text}")
        return resp

    async def _load_map(self) -> None:
        offset: int | None = 0
        while offset is not None:
            resp = await self._get(self.map_url, {"offset": str(offset)})
            try:
                page: dict[str, Any] = await resp.json()
            finally:
                resp.release()
            for e in page.get("extents") or []:
                self.extents.append(
                    MapExtent(
                        int(e["offset"]), int(e["length"]), int(e["type"]), str(e["description"])
                    )
                )
            offset = page.get("next_offset")
        if self.extents:
            last = self.extents[-1]
            self.size = last.offset + last.length

    async def read(self, offset: int, length: int) -> bytes:
        params = {"offset": str(offset), "length": str(length)}
        resp = await self._get(self.data_url, params)
        try:
            data = await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise EndpointError(f"backup endpoint {self.data_url}: {exc}") from None
        finally:
            resp.release()
        return data

    async def zero_extents(self) -> list[Extent]:
        return [(e.offset, e.length) for e in self.extents if e.type & ZERO_BIT]

    def changed(self) -> list[Extent]:
        """What an incremental backup's map says was written since the checkpoint (ranges that
        read as zeros included: the previous backup may hold data there)."""
        return [(e.offset, e.length) for e in self.extents if e.type & DIRTY_BIT]


__all__ = ["EndpointError", "EndpointSource", "MapExtent"]
