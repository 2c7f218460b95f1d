"""Noise handshakes (the Noise Protocol Framework, revision 34) built on pynacl.

Only what enrolment needs: DH ``25519`` (X25519), cipher ``ChaChaPoly``
(ChaCha20-Poly1305, IETF nonce: four zero bytes, then the counter little-endian),
hash ``BLAKE2b`` (HMAC and HKDF over hashlib's BLAKE2b, as the specification
defines them), and the patterns of :data:`PATTERNS`. Written from the
specification; the unit tests check it against an independent implementation's
output for fixed keys.

The rules the code follows (section numbers of the specification):

- 5.2 SymmetricState: ``h`` starts as the protocol name padded to 64 bytes, ``ck = h``,
  then the prologue is hashed in; every key and payload is hashed into ``h`` as it
  is written, so both sides' ``h`` (the *handshake hash*) is equal only if they saw
  the same bytes in the same order: it binds the transcript.
- 9 ``psk`` modifier: the pre-shared key is mixed in by ``MixKeyAndHash``, and in a
  psk handshake every ``e`` also mixes the ephemeral key into the chaining key, so
  the first message's payload tag is checked with the psk: a wrong psk fails at
  the first message, on the side that reads it.
- A failed check raises :class:`HandshakeError` and the state must be thrown away;
  nothing says which check failed.

Public API::

    PATTERNS; protocol_name(pattern) -> str
    Handshake(pattern, *, initiator, prologue=b"", static_key=None, psk=None)
      .write_message(payload=b"") -> bytes; .read_message(message) -> bytes
      .complete; .handshake_hash; .remote_static; .ephemeral_public; .split() -> (send, receive)
    CipherState(key) .encrypt(plaintext, ad=b"") .decrypt(ciphertext, ad=b"")
    generate_private_key() -> bytes; public_key(private_key) -> bytes
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

from nacl.bindings import (
    crypto_aead_chacha20poly1305_ietf_decrypt,
    crypto_aead_chacha20poly1305_ietf_encrypt,
    crypto_scalarmult,
    crypto_scalarmult_base,
)
from nacl.exceptions import CryptoError

from meshd.errors import IdentityError

DHLEN = 32
HASHLEN = 64
KEYLEN = 32
TAGLEN = 16
MAX_MESSAGE = 65535
_MAX_NONCE = 2**64 - 1  # reserved by the specification

# Message patterns: the tokens of each message, initiator first, then alternating.
PATTERNS: dict[str, tuple[tuple[str, ...], ...]] = {
    "NXpsk0": (("psk", "e"), ("e", "ee", "s", "es")),
    "XXpsk0": (("psk", "e"), ("e", "ee", "s", "es"), ("s", "se")),
}


class HandshakeError(IdentityError):
    """A Noise message did not decrypt or verify, or came out of turn."""


def protocol_name(pattern: str) -> str:
    return f"Noise_{pattern}_25519_ChaChaPoly_BLAKE2b"


def generate_private_key() -> bytes:
    return os.urandom(DHLEN)


def public_key(private_key: bytes) -> bytes:
    return bytes(crypto_scalarmult_base(private_key))


def _dh(private_key: bytes, public: bytes) -> bytes:
    try:
        return bytes(crypto_scalarmult(private_key, public))
    except Exception as exc:
        # libsodium refuses a low-order point (an all-zero result); pynacl raises its
        # own RuntimeError or a TypeError for a wrong length.
        raise HandshakeError("the handshake failed") from exc


def _hash(data: bytes) -> bytes:
    return hashlib.blake2b(data).digest()


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.blake2b).digest()


def _hkdf(chaining_key: bytes, ikm: bytes, outputs: int) -> tuple[bytes, ...]:
    temp = _hmac(chaining_key, ikm)
    out: list[bytes] = []
    previous = b""
    for i in range(1, outputs + 1):
        previous = _hmac(temp, previous + bytes([i]))
        out.append(previous)
    return tuple(out)


class CipherState:
    """One direction's key and message counter; every message gets the next nonce."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key
        self._n = 0

    @property
    def has_key(self) -> bool:
        return self._key is not None

    def _nonce(self) -> bytes:
        if self._n >= _MAX_NONCE:
            raise HandshakeError("too many messages under one key")
        return b"\x00\x00\x00\x00" + struct.pack("<Q", self._n)

    def encrypt(self, plaintext: bytes, ad: bytes = b"") -> bytes:
        if self._key is None:
            return plaintext
        out = crypto_aead_chacha20poly1305_ietf_encrypt(plaintext, ad, self._nonce(), self._key)
        self._n += 1
        return bytes(out)

    def decrypt(self, ciphertext: bytes, ad: bytes = b"") -> bytes:
        if self._key is None:
            return ciphertext
        try:
            out = crypto_aead_chacha20poly1305_ietf_decrypt(
                ciphertext, ad, self._nonce(), self._key
            )
        except (CryptoError, TypeError, ValueError) as exc:
            raise HandshakeError("a message does not decrypt (wrong key or tampered)") from exc
        # The counter moves only on success (specification 5.1).
        self._n += 1
        return bytes(out)


class _SymmetricState:
    def __init__(self, name: bytes) -> None:
        self.h = name.ljust(HASHLEN, b"\x00") if len(name) <= HASHLEN else _hash(name)
        self.ck = self.h
        self.cipher = CipherState()

    def mix_key(self, ikm: bytes) -> None:
        self.ck, temp_k = _hkdf(self.ck, ikm, 2)
        self.cipher = CipherState(temp_k[:KEYLEN])

    def mix_hash(self, data: bytes) -> None:
        self.h = _hash(self.h + data)

    def mix_key_and_hash(self, ikm: bytes) -> None:
        self.ck, temp_h, temp_k = _hkdf(self.ck, ikm, 3)
        self.mix_hash(temp_h)
        self.cipher = CipherState(temp_k[:KEYLEN])

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cipher.encrypt(plaintext, self.h)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self.cipher.decrypt(ciphertext, self.h)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        k1, k2 = _hkdf(self.ck, b"", 2)
        return CipherState(k1[:KEYLEN]), CipherState(k2[:KEYLEN])


class Handshake:
    """One side of a Noise handshake; write and read its messages in turn, then split.

    ``static_key`` is this side's X25519 private key (for patterns with ``s`` on this
    side); ``psk`` a 32-byte pre-shared key (for ``psk`` patterns). ``ephemeral_key``
    fixes the ephemeral private key: for test vectors only.
    """

    def __init__(
        self,
        pattern: str,
        *,
        initiator: bool,
        prologue: bytes = b"",
        static_key: bytes | None = None,
        psk: bytes | None = None,
        ephemeral_key: bytes | None = None,
    ) -> None:
        if pattern not in PATTERNS:
            raise ValueError(f"unknown Noise pattern {pattern!r}")
        self._messages = PATTERNS[pattern]
        uses_psk = any("psk" in message for message in self._messages)
        if uses_psk and (psk is None or len(psk) != KEYLEN):
            raise ValueError(f"{pattern} needs a {KEYLEN}-byte psk")
        self._psk = psk
        self._uses_psk = uses_psk
        self.initiator = initiator
        self._ss = _SymmetricState(protocol_name(pattern).encode("ascii"))
        self._ss.mix_hash(prologue)
        self._s = static_key
        self._e = ephemeral_key
        self._rs: bytes | None = None
        self._re: bytes | None = None
        self._turn = 0
        self._failed = False

    @property
    def complete(self) -> bool:
        return self._turn == len(self._messages)

    @property
    def handshake_hash(self) -> bytes:
        """``h``: equal on both sides only for the same transcript (use it to bind signatures)."""
        return self._ss.h

    @property
    def remote_static(self) -> bytes | None:
        """The other side's static public key, once its ``s`` token was read."""
        return self._rs

    @property
    def ephemeral_public(self) -> bytes | None:
        return None if self._e is None else public_key(self._e)

    def _my_turn(self) -> bool:
        return (self._turn % 2 == 0) == self.initiator

    def _check_turn(self, writing: bool) -> None:
        if self._failed:
            raise HandshakeError("the handshake already failed")
        if self.complete:
            raise HandshakeError("the handshake is already complete")
        if self._my_turn() != writing:
            raise HandshakeError("a handshake message out of turn")

    def write_message(self, payload: bytes = b"") -> bytes:
        self._check_turn(writing=True)
        ss = self._ss
        out = bytearray()
        for token in self._messages[self._turn]:
            if token == "e":
                if self._e is None:
                    self._e = generate_private_key()
                e_public = public_key(self._e)
                out += e_public
                ss.mix_hash(e_public)
                if self._uses_psk:
                    ss.mix_key(e_public)
            elif token == "s":
                if self._s is None:
                    raise ValueError("this pattern needs a static key on this side")
                out += ss.encrypt_and_hash(public_key(self._s))
            elif token == "psk":
                assert self._psk is not None
                ss.mix_key_and_hash(self._psk)
            else:
                ss.mix_key(self._dh_token(token))
        out += ss.encrypt_and_hash(payload)
        if len(out) > MAX_MESSAGE:
            raise ValueError(f"a Noise message is at most {MAX_MESSAGE} bytes")
        self._turn += 1
        return bytes(out)

    def read_message(self, message: bytes) -> bytes:
        """The payload; HandshakeError if the message does not verify."""
        self._check_turn(writing=False)
        try:
            payload = self._read(message)
        except HandshakeError:
            self._failed = True
            raise
        self._turn += 1
        return payload

    def _read(self, message: bytes) -> bytes:
        ss = self._ss
        rest = memoryview(message)
        for token in self._messages[self._turn]:
            if token == "e":
                if len(rest) < DHLEN:
                    raise HandshakeError("a handshake message is too short")
                self._re = bytes(rest[:DHLEN])
                rest = rest[DHLEN:]
                ss.mix_hash(self._re)
                if self._uses_psk:
                    ss.mix_key(self._re)
            elif token == "s":
                size = DHLEN + (TAGLEN if ss.cipher.has_key else 0)
                if len(rest) < size:
                    raise HandshakeError("a handshake message is too short")
                self._rs = ss.decrypt_and_hash(bytes(rest[:size]))
                rest = rest[size:]
            elif token == "psk":
                assert self._psk is not None
                ss.mix_key_and_hash(self._psk)
            else:
                ss.mix_key(self._dh_token(token))
        if ss.cipher.has_key and len(rest) < TAGLEN:
            raise HandshakeError("a handshake message is too short")
        return ss.decrypt_and_hash(bytes(rest))

    def _dh_token(self, token: str) -> bytes:
        # "es": the initiator's ephemeral with the responder's static; "se" the reverse.
        mine, theirs = token[0], token[1]
        if not self.initiator:
            mine, theirs = theirs, mine
        local = self._e if mine == "e" else self._s
        remote = self._re if theirs == "e" else self._rs
        if local is None or remote is None:
            raise HandshakeError(f"the {token} token needs a key this side does not have")
        return _dh(local, remote)

    def split(self) -> tuple[CipherState, CipherState]:
        """(send, receive) cipher states once the handshake is complete."""
        if not self.complete or self._failed:
            raise HandshakeError("the handshake is not complete")
        first, second = self._ss.split()
        return (first, second) if self.initiator else (second, first)
