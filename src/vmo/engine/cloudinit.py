"""Cloud-init seeds for VMIs: NoCloud (label ``cidata``) and ConfigDrive (label ``config-2``).

What goes in them follows KubeVirt: meta-data carries ``instance-id`` and ``local-hostname``;
user and network data come inline, base64 or from a Secret (``userdata``/``networkdata`` keys).
"""

from __future__ import annotations

import base64
import binascii
import json
import shutil
import subprocess
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JSON = dict[str, Any]

SecretReader = Callable[[str, str], Awaitable[JSON | None]]
"""(namespace, name) -> the Secret, or None when it does not exist."""


class SeedError(Exception):
    """A cloud-init volume cannot be turned into a seed; ``field`` names the spec path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class SeedContent:
    kind: str  # "nocloud" | "configdrive"
    user_data: str
    network_data: str | None
    instance_id: str
    hostname: str


def cloud_init_volume(vmi: JSON) -> tuple[int, JSON] | None:
    for index, volume in enumerate(vmi["spec"].get("volumes") or []):
        if "cloudInitNoCloud" in volume or "cloudInitConfigDrive" in volume:
            return index, volume
    return None


async def _text(
    source: JSON,
    *,
    inline: str,
    b64: str,
    secret_ref: str,
    secret_key: str,
    field: str,
    namespace: str,
    read_secret: SecretReader,
) -> str | None:
    if inline in source:
        return str(source[inline])
    if b64 in source:
        try:
            return base64.b64decode(str(source[b64]), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise SeedError(f"{field}.{b64}", f"not valid base64 text: {exc}") from None
    if secret_ref in source:
        name = str(source[secret_ref].get("name", ""))
        secret = await read_secret(namespace, name)
        if secret is None:
            raise SeedError(f"{field}.{secret_ref}.name", f'secret "{name}" not found')
        data = secret.get("data") or {}
        for key in (secret_key, secret_key.replace("data", "Data")):
            if key in data:
                return base64.b64decode(data[key]).decode()
        raise SeedError(f"{field}.{secret_ref}", f'secret "{name}" has no "{secret_key}" key')
    return None


async def seed_content(vmi: JSON, read_secret: SecretReader) -> SeedContent | None:
    found = cloud_init_volume(vmi)
    if found is None:
        return None
    index, volume = found
    kind = "nocloud" if "cloudInitNoCloud" in volume else "configdrive"
    key = "cloudInitNoCloud" if kind == "nocloud" else "cloudInitConfigDrive"
    source = volume[key]
    field = f"spec.volumes[{index}].{key}"
    namespace = vmi["metadata"]["namespace"]
    user = await _text(
        source,
        inline="userData",
        b64="userDataBase64",
        secret_ref="secretRef",
        secret_key="userdata",
        field=field,
        namespace=namespace,
        read_secret=read_secret,
    )
    network = await _text(
        source,
        inline="networkData",
        b64="networkDataBase64",
        secret_ref="networkDataSecretRef",
        secret_key="networkdata",
        field=field,
        namespace=namespace,
        read_secret=read_secret,
    )
    md = vmi["metadata"]
    return SeedContent(
        kind=kind,
        user_data=user or "",
        network_data=network,
        instance_id=f"{md['name']}.{md['namespace']}",
        hostname=str(vmi["spec"].get("hostname") or md["name"]),
    )


def write_seed(content: SeedContent, target: Path) -> Path:
    """Writes the seed as an ISO 9660 image at ``target`` (genisoimage, argv only)."""
    with tempfile.TemporaryDirectory(prefix="vmo-seed-", dir=target.parent) as tmp:
        root = Path(tmp)
        if content.kind == "nocloud":
            label = "cidata"
            (root / "meta-data").write_text(
                f"instance-id: {content.instance_id}\nlocal-hostname: {content.hostname}\n"
            )
            (root / "user-data").write_text(content.user_data)
            if content.network_data is not None:
                (root / "network-config").write_text(content.network_data)
        else:
            label = "config-2"
            latest = root / "openstack" / "latest"
            latest.mkdir(parents=True)
            meta = {
                "uuid": content.instance_id,
                "hostname": content.hostname,
                "name": content.hostname,
            }
            (latest / "meta_data.json").write_text(json.dumps(meta))
            (latest / "user_data").write_text(content.user_data)
            if content.network_data is not None:
                (latest / "network_data.json").write_text(content.network_data)
        tmp_iso = target.with_suffix(".tmp")
        argv = [
            "genisoimage",
            "-quiet",
            "-output",
            str(tmp_iso),
            "-volid",
            label,
            "-joliet",
            "-rock",
            "--",  # the tree after it is never read as an option
            str(root),
        ]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tmp_iso.unlink(missing_ok=True)
            raise SeedError("spec.volumes", f"genisoimage failed: {proc.stderr.strip()}")
        shutil.move(str(tmp_iso), target)
    return target
