"""A node's long-lived keys: the WireGuard (node) key and the disco key, both X25519.

Kept as hex in files of their own in the data dir, readable by the owner only. Text forms follow
Tailscale's: ``nodekey:<hex>`` and ``discokey:<hex>`` for public keys.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from nacl.public import PrivateKey


@dataclass(frozen=True)
class NodeKeys:
    node_private: bytes
    disco_private: bytes

    @property
    def node_public(self) -> bytes:
        return bytes(PrivateKey(self.node_private).public_key)

    @property
    def disco_public(self) -> bytes:
        return bytes(PrivateKey(self.disco_private).public_key)

    @classmethod
    def generate(cls) -> NodeKeys:
        return cls(bytes(PrivateKey.generate()), bytes(PrivateKey.generate()))


def _load_or_create(path: str) -> bytes:
    try:
        with open(path) as f:
            raw = bytes.fromhex(f.read().strip())
        if len(raw) == 32:
            return raw
        raise ValueError(f"{path}: not a 32-byte key")
    except FileNotFoundError:
        pass
    key = bytes(PrivateKey.generate())
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    os.replace(path + ".tmp", path)
    return key


def load_node_keys(data_dir: str) -> NodeKeys:
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    return NodeKeys(
        _load_or_create(os.path.join(data_dir, "wireguard.key")),
        _load_or_create(os.path.join(data_dir, "disco.key")),
    )
