"""How a backup repository's blobs are named and sealed: chunk ids, compression, encryption.

A chunk's id is the SHA-256 of its plain bytes; in an encrypted repository it is an HMAC-SHA256
under a key derived from the repository's key instead, so that ids say nothing about the data to
whoever holds only the store (as restic and borg key theirs). Equal data has one id either way:
that is the deduplication, across disks and VMs.

A sealed blob is ``MAGIC``, one flags byte, then the payload: zstd-compressed when that makes it
smaller, then AES-256-GCM-encrypted when the repository has a key, with a random 96-bit nonce
and the blob's name as associated data, so that a blob cannot be passed off under another name.
The primitives are the well-kept libraries' (hashlib, ``zstandard``, ``cryptography``); what is
VMO's own is only this framing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import threading
from dataclasses import dataclass
from typing import Any

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

MAGIC = b"VMOB"
COMPRESSED = 0x01
ENCRYPTED = 0x02
NONCE = 12
ZSTD_LEVEL = 1
KEY_CHECK = b"vmo backup repository key check v1"
# scrypt's interactive-login cost (RFC 7914 recommends N=2^14 and up): a key is derived once per
# repository opened, not per chunk
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 15, 8, 1


class CodecError(Exception):
    """A blob that does not decode: damaged, truncated, or sealed under another key."""


class WrongKey(Exception):
    """The key given does not open the repository (or one is needed, or none is)."""


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """One compressor per thread and level (they are not thread-safe, and cost to make)."""
    found: dict[int, zstandard.ZstdCompressor] = getattr(_local, "compressors", None) or {}
    _local.compressors = found
    if level not in found:
        found[level] = zstandard.ZstdCompressor(level=level)
    return found[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    found: zstandard.ZstdDecompressor | None = getattr(_local, "decompressor", None)
    if found is None:
        found = _local.decompressor = zstandard.ZstdDecompressor()
    return found


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode())


@dataclass(frozen=True)
class Keys:
    """The two keys derived from the repository's key: one seals, one names chunks."""

    seal: bytes
    ids: bytes

    @classmethod
    def derive(cls, secret: bytes, salt: bytes, kdf: dict[str, Any]) -> Keys:
        master = Scrypt(salt=salt, length=32, n=kdf["n"], r=kdf["r"], p=kdf["p"]).derive(secret)

        def sub(label: bytes) -> bytes:
            return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=label).derive(master)

        return cls(seal=sub(b"vmo-backup-seal"), ids=sub(b"vmo-backup-ids"))


@dataclass(frozen=True)
class Codec:
    """Seals and opens blobs, and names chunks, for one repository (with its key, or none)."""

    keys: Keys | None = None
    level: int = ZSTD_LEVEL

    # --- repository configuration ------------------------------------------------------------

    @staticmethod
    def new_encryption(secret: bytes) -> tuple[Codec, dict[str, Any]]:
        """A codec for a new encrypted repository, and what its configuration records of it."""
        salt = secrets.token_bytes(16)
        kdf = {"name": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P}
        codec = Codec(Keys.derive(secret, salt, kdf))
        check = codec.seal(KEY_CHECK, name="config")
        return codec, {
            "cipher": "AES-256-GCM",
            "kdf": kdf,
            "salt": _b64(salt),
            "check": _b64(check),
        }

    @staticmethod
    def for_config(encryption: dict[str, Any] | None, secret: bytes | None) -> Codec:
        """The codec of an existing repository, checking the key against its configuration."""
        if encryption is None:
            if secret is not None:
                raise WrongKey("the repository is not encrypted, but an encryption key was given")
            return Codec()
        if secret is None:
            raise WrongKey("the repository is encrypted: its encryption key is needed")
        codec = Codec(Keys.derive(secret, _unb64(encryption["salt"]), encryption["kdf"]))
        try:
            opened = codec.open(_unb64(encryption["check"]), name="config")
        except CodecError:
            opened = b""
        if not hmac.compare_digest(opened, KEY_CHECK):
            raise WrongKey("the encryption key given does not open this repository")
        return codec

    @property
    def encrypted(self) -> bool:
        return self.keys is not None

    # --- chunks --------------------------------------------------------------------------------

    def chunk_id(self, data: bytes | memoryview) -> bytes:
        """The 32-byte id of a chunk's plain bytes."""
        if self.keys is None:
            return hashlib.sha256(data).digest()
        return hmac.new(self.keys.ids, data, hashlib.sha256).digest()

    # --- sealing -------------------------------------------------------------------------------

    def seal(self, data: bytes | memoryview, *, name: str) -> bytes:
        flags = 0
        payload = bytes(data)
        packed = _compressor(self.level).compress(payload)
        if len(packed) < len(payload):
            payload, flags = packed, flags | COMPRESSED
        if self.keys is not None:
            nonce = os.urandom(NONCE)
            sealed = AESGCM(self.keys.seal).encrypt(nonce, payload, name.encode())
            payload, flags = nonce + sealed, flags | ENCRYPTED
        return MAGIC + bytes([flags]) + payload

    def open(self, blob: bytes, *, name: str) -> bytes:
        if len(blob) < len(MAGIC) + 1 or blob[: len(MAGIC)] != MAGIC:
            raise CodecError(f"{name}: not a VMO backup blob")
        flags, payload = blob[len(MAGIC)], blob[len(MAGIC) + 1 :]
        if flags & ENCRYPTED:
            if self.keys is None:
                raise CodecError(f"{name}: encrypted, and no key is open")
            try:
                payload = AESGCM(self.keys.seal).decrypt(
                    payload[:NONCE], payload[NONCE:], name.encode()
                )
            except (InvalidTag, ValueError):
                raise CodecError(
                    f"{name}: fails authentication (damaged, or another key's)"
                ) from None
        elif self.keys is not None:
            raise CodecError(f"{name}: not encrypted in an encrypted repository")
        if flags & COMPRESSED:
            try:
                payload = _decompressor().decompress(payload)
            except zstandard.ZstdError as exc:
                raise CodecError(f"{name}: does not decompress ({exc})") from None
        return payload


__all__ = ["Codec", "CodecError", "Keys", "WrongKey"]
