"""Ed25519 signatures for releases: who signed a manifest and an audit row, checkable by anyone.

The private key lives outside the lakehouse, like the pseudonym key: the
environment variable ``privacy.signing_key_env`` (default ``MIGRALAKE_SIGNING_KEY``:
64 hex digits, the 32-byte Ed25519 seed) or the file ``privacy.signing_key_file``
(the same hex, or a PKCS#8 PEM). Only the demo profile may generate a throwaway
key for one run, and it says so. The public key is published with every release
(``signing_key.pub``, hex) and recorded in ``audit.releases``; a reviewer pins the
platform's key with ``audit verify --public-key FILE`` or ``MIGRALAKE_SIGNING_PUBLIC_KEY``.

Reads and writes no tables.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from lib.config import PrivacySettings
from lib.privacy.keyfiles import read_secret

log = logging.getLogger("migralake.privacy")
PUBLIC_KEY_ENV = "MIGRALAKE_SIGNING_PUBLIC_KEY"


class SigningKeyError(RuntimeError):
    """No usable signing key; the message says where one is looked for."""


@dataclass(frozen=True)
class Signer:
    key: Ed25519PrivateKey
    origin: str

    @property
    def public_hex(self) -> str:
        return public_hex(self.key.public_key())

    def sign(self, data: bytes) -> str:
        return self.key.sign(data).hex()


def public_hex(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def fingerprint(public_key_hex: str) -> str:
    """Short SHA-256 fingerprint of a public key, for messages and reports."""
    return hashlib.sha256(bytes.fromhex(public_key_hex)).hexdigest()[:16]


def _private_from_text(text: str, origin: str) -> Ed25519PrivateKey:
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_private_key(text.encode(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise SigningKeyError(f"signing key from {origin} is not an Ed25519 key")
            return key
        seed = bytes.fromhex(text)
    except ValueError as exc:
        raise SigningKeyError(f"signing key from {origin}: not 64 hex digits or an Ed25519 PEM ({exc})") from None
    if len(seed) != 32:
        raise SigningKeyError(f"signing key from {origin} is {len(seed)} bytes; an Ed25519 seed is 32 "
                              "(e.g. `openssl rand -hex 32`)")
    return Ed25519PrivateKey.from_private_bytes(seed)


def load_signer(settings: PrivacySettings, env: dict[str, str] | None = None) -> Signer:
    """The platform's signing key from the environment or the secrets file (see the module docstring)."""
    env = dict(os.environ) if env is None else env
    raw, origin = read_secret(env, settings.signing_key_env, settings.signing_key_file, "signing key",
                              SigningKeyError)
    if not raw:
        if not settings.signing_demo_generate:
            raise SigningKeyError(
                f"no release signing key: set the environment variable {settings.signing_key_env} "
                "(64 hex digits, e.g. `openssl rand -hex 32`) or point privacy.signing_key_file at a secrets "
                "file outside the repository and the lakehouse. Refusing to release.")
        raw = os.urandom(32).hex()
        os.environ[settings.signing_key_env] = raw  # every later release of this run signs with the same key
        log.warning("no release signing key set: generated a throwaway demo key for this run only "
                    "(set %s or privacy.signing_key_file for real releases)", settings.signing_key_env)
        origin = "generated demo key"
    return Signer(_private_from_text(raw, origin), origin)


Keyring = frozenset[str]  # trusted public keys (hex): the platform's key and any it was rotated from


def trusted_public_key(settings: PrivacySettings, given: str | None = None,
                       env: dict[str, str] | None = None) -> tuple[Keyring | None, str]:
    """The public keys a reviewer trusts, and where they came from: ``given`` (a file with one hex key a line,
    or the hex itself), else MIGRALAKE_SIGNING_PUBLIC_KEY (keys separated by commas or spaces), else the public
    half of the configured private key; else (None, why)."""
    env = dict(os.environ) if env is None else env
    if given:
        p = Path(given)
        text = p.read_text(encoding="utf-8") if p.exists() else given
        return _keyring(text, f"--public-key {given}"), f"--public-key {given}"
    if env.get(PUBLIC_KEY_ENV):
        return _keyring(env[PUBLIC_KEY_ENV], PUBLIC_KEY_ENV), PUBLIC_KEY_ENV
    if env.get(settings.signing_key_env) or settings.signing_key_file:
        signer = load_signer(settings.model_copy(update={"signing_demo_generate": False}), env)
        return frozenset({signer.public_hex}), f"the platform's signing key ({signer.origin})"
    return None, "no trusted key given (audit verify --public-key FILE or MIGRALAKE_SIGNING_PUBLIC_KEY)"


def _keyring(text: str, origin: str) -> Keyring:
    keys = [k for k in text.replace(",", " ").split() if k]
    if not keys:
        raise SigningKeyError(f"public key from {origin}: empty")
    return frozenset(_check_public(k, origin) for k in keys)


def describe(keys: Keyring) -> str:
    return ", ".join(fingerprint(k) for k in sorted(keys))


def _check_public(text: str, origin: str) -> str:
    try:
        raw = bytes.fromhex(text.strip())
        Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise SigningKeyError(f"public key from {origin}: not a 32-byte Ed25519 key in hex ({exc})") from None
    return raw.hex()


def verify(public_key_hex: str, data: bytes, signature_hex: str) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex)).verify(bytes.fromhex(signature_hex), data)
    except (InvalidSignature, ValueError):
        return False
    return True
