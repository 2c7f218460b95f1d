"""What this node trusts: members' certificate chains and the network's revocations.

Pure bookkeeping (the agent does the I/O): chains fetched from members are
kept by their reference (the ``c`` tag of a record), each member's record is
checked against its chain, and revocations, route grants and client records are
verified, kept and persisted in ``<state_dir>/revocations``, ``route-grants`` and
``clients``.
Both travel together: one digest (a record's ``revocations`` field) and one
paged query cover them, each item told apart by its magic bytes.

A member is *certified* when its chain leads to the network CA (directly or
through an enrolment key, :func:`meshd.pki.certificate.verify_chain`), nothing in it is
revoked or expired, and its node certificate binds the member's name and
WireGuard key. Addresses the certificate binds are *certified addresses*: they
win any address conflict against a claim the certificate does not cover.
Knowing the gossip key alone makes nobody certified.

CA keys (``meshd ca rotate``, :class:`meshd.pki.certificate.Roots`): a node trusts
the CA key it joined under, and every key a trusted key cross-signed (a root
certificate, learnt from any chain that carries one, kept in ``<state_dir>/ca-roots``).
A trusted key is *retired* by a revocation of it signed by another trusted key: it
is never trusted again, and the revocations only it signed are dropped (every
certificate they could cover chains to it). Both files are rewritten atomically,
and a restart reads the roots first, then the revocations, so it ends where it was.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from meshd.binary import BinaryReader, BinaryWriter
from meshd.errors import DecodeError, IdentityError
from meshd.identity import decode_key
from meshd.pki.certificate import (
    FORMAT_VERSION,
    KEY_LEN,
    NO_SERIAL,
    CertChain,
    Certificate,
    Role,
    Roots,
    decode_signed,
    key_id,
    network_id_of,
    verify,
)
from meshd.pki.client import CLIENT_MAGIC, ClientRecord, verify_client
from meshd.pki.grant import GRANT_MAGIC, GrantList, RouteGrant
from meshd.pki.revocation import Revocation, RevocationList
from meshd.state import DeferredWrites, atomic_write
from meshd.types import IPAddress, NodeRecord

log = logging.getLogger(__name__)

REVOCATIONS_FILE = "revocations"
ROOTS_FILE = "ca-roots"
_ROOTS_MAGIC = b"MX"
GRANTS_FILE = "route-grants"
CLIENTS_FILE = "clients"
_CLIENT_LIST_MAGIC = b"MK"
# A Serf query response carries at most 1024 bytes; a revocation is ~150.
REVOCATIONS_PER_PAGE = 5
EXPIRY_WARNING = 14 * 86400
PENDING = "certificate not fetched yet"
MAX_CHAINS = 4096


@dataclass(frozen=True)
class Verdict:
    """Whether a member's record is backed by a valid certificate chain."""

    certified: bool
    error: str | None = None
    addresses: tuple[IPAddress, ...] = ()
    expires: int | None = None
    issuer: bytes | None = None
    """The CA key that issued the chain (which matters during a CA rotation)."""


class Trust:
    """Chains by reference, verdicts on records, and the revocation list."""

    def __init__(
        self, ca_public_key: bytes, state_dir: Path, *, writes: DeferredWrites | None = None
    ) -> None:
        # The daemon's writes wait in memory while the disk is full; without, they raise.
        self._writes = writes
        self._path = Path(state_dir) / REVOCATIONS_FILE
        self._roots_path = Path(state_dir) / ROOTS_FILE
        self._chains: dict[str, CertChain] = {}
        self._verdicts: dict[tuple[str, str, str], tuple[int, Verdict]] = {}
        self.roots = Roots((ca_public_key,))
        self._cross: list[Certificate] = []
        self._retired: set[bytes] = set()
        self._grants_path = Path(state_dir) / GRANTS_FILE
        self.revoked = RevocationList()
        self.grants = GrantList()
        self._clients_path = Path(state_dir) / CLIENTS_FILE
        self._clients: dict[str, ClientRecord] = {}
        self.generation = 0
        self._load_roots()
        self._load()
        if self._apply_retirements():
            self._save(self._path, self.revoked.encode())

    def _save(self, path: Path, data: bytes) -> None:
        if self._writes is None:
            atomic_write(path, data)
        else:
            self._writes.write(path, data)

    # --- CA keys ----------------------------------------------------------------

    @property
    def rotating(self) -> bool:
        """Whether more than one CA key is trusted (a rotation not retired yet)."""
        return len(self.roots.keys) > 1

    def cross_for(self, ca_key: bytes) -> Certificate | None:
        """The cross-signature that made ``ca_key`` trusted, while its signer is."""
        for cross in self._cross:
            if cross.public_key_bytes == ca_key and self.roots.find(cross.issuer_key_id):
                return cross
        return None

    def learn_root(self, cross: Certificate, now: int | None = None) -> bool:
        """Trust the CA key ``cross`` vouches for, when a trusted key signed it; True
        when that key is new. IdentityError when ``cross`` does not hold."""
        when = int(time.time() if now is None else now)
        subject = cross.public_key_bytes if cross.role is Role.ROOT else None
        if subject is not None and subject in self.roots.keys:
            return False
        signer = self._trust_cross(cross, when)
        self._save_roots()
        self.generation += 1
        log.warning(
            "now trusting CA key %s, cross-signed by CA key %s",
            network_id_of(cross.public_key_bytes),
            network_id_of(signer),
        )
        return True

    def _trust_cross(self, cross: Certificate, now: int) -> bytes:
        """Add the key ``cross`` vouches for to the roots; the key that signed it."""
        if cross.role is not Role.ROOT:
            raise IdentityError(f"{cross.describe()} is not a root certificate")
        subject = cross.public_key_bytes
        if subject in self._retired:
            raise IdentityError(f"CA key {network_id_of(subject)} was retired")
        signer = self.roots.find(cross.issuer_key_id)
        if signer is None:
            raise IdentityError(f"{cross.describe()} was not signed by a trusted CA key")
        if cross.network_id != network_id_of(signer):
            raise IdentityError(f"{cross.describe()} belongs to network {cross.network_id}")
        verify(cross, signer, now)
        self.roots = Roots((*self.roots.keys, subject))
        self._cross.append(cross)
        return signer

    def _retirement(self, revocation: Revocation) -> bytes | None:
        """The trusted CA key ``revocation`` retires (signed by another trusted key)."""
        if revocation.serial != NO_SERIAL or not revocation.public_key:
            return None
        target = decode_key(revocation.public_key, what="revoked key")
        if target not in self.roots.keys or key_id(target) == revocation.issuer_key_id:
            return None
        return target

    def _apply_retirements(self) -> bool:
        """Retire every CA key a held revocation names; True when one was."""
        retired = False
        for revocation in list(self.revoked):
            target = self._retirement(revocation)
            if target is None or self.roots.find(revocation.issuer_key_id) is None:
                continue
            self._retire(target)
            dropped = self.revoked.keep_only(self.roots)
            log.warning(
                "CA key %s retired: certificates issued only by it are refused now "
                "(%d revocation(s) it signed dropped)",
                network_id_of(target),
                dropped,
            )
            retired = True
        if retired:
            self._save_roots()
        return retired

    def _retire(self, key: bytes) -> None:
        remaining = tuple(k for k in self.roots.keys if k != key)
        if remaining:  # never the last one (a retirement is signed by another key)
            self.roots = Roots(remaining)
            self._retired.add(key)

    def _save_roots(self) -> None:
        """The cross-signatures learnt (they re-derive the keys from the one joined
        under) and the keys retired (the revocation that retired a key is dropped when
        its own signer is retired in turn, so the file remembers)."""
        writer = BinaryWriter().header(_ROOTS_MAGIC, FORMAT_VERSION).u8(len(self._cross))
        for cross in self._cross:
            writer.long_bytes(cross.encode())
        writer.u8(len(self._retired))
        for key in sorted(self._retired):
            writer.raw(key)
        self._save(self._roots_path, writer.getvalue())

    def _load_roots(self) -> None:
        try:
            data = self._roots_path.read_bytes()
        except FileNotFoundError:
            return

        def read(reader: BinaryReader) -> tuple[list[Certificate], list[bytes]]:
            crosses = [Certificate.decode(reader.long_bytes()) for _ in range(reader.u8())]
            return crosses, [reader.raw(KEY_LEN) for _ in range(reader.u8())]

        try:
            crosses, retired = decode_signed(data, "CA roots", _ROOTS_MAGIC, read)
            for cross in crosses:
                if cross.public_key_bytes not in self.roots.keys:
                    # Checked in time when learnt; the signatures are checked again here.
                    self._trust_cross(cross, cross.not_before)
            for key in retired:
                self._retire(key)
        except IdentityError as exc:
            log.error("%s is damaged (%s); trusting the CA keys read so far", self._roots_path, exc)

    # --- chains -------------------------------------------------------------

    def has_chain(self, ref: str) -> bool:
        return ref in self._chains

    def chain(self, ref: str) -> CertChain | None:
        return self._chains.get(ref)

    def add_chain(self, data: bytes, expected_ref: str) -> CertChain:
        """Keep a chain; IdentityError when it is garbage, not the one asked for, or not
        signed for this network (anything with the gossip key can announce one)."""
        chain = CertChain.decode(data)
        if chain.ref != expected_ref:
            raise IdentityError(f"the chain answered is {chain.ref}, not {expected_ref}")
        if chain.cross is not None and chain.cross.public_key_bytes not in self.roots.keys:
            try:
                self.learn_root(chain.cross)
            except IdentityError as exc:
                log.debug("a chain's cross-signature is not trusted: %s", exc)
        # Signatures and windows only: a revoked or expired chain is kept, and refused
        # by verdict(), which says why.
        chain.verify(self.roots, chain.node.not_before)
        if len(self._chains) >= MAX_CHAINS:
            self._chains.pop(next(iter(self._chains)))  # the oldest
        self._chains[expected_ref] = chain
        return chain

    def verdict(self, name: str, record: NodeRecord, now: float | None = None) -> Verdict:
        """Check ``record`` (published by member ``name``) against its chain."""
        when = int(time.time() if now is None else now)
        key = (name, record.public_key, record.cert)
        cached = self._verdicts.get(key)
        if cached is not None and cached[0] == self.generation:
            verdict = cached[1]
            if verdict.expires is None or when < verdict.expires:
                return verdict
        verdict = self._check(name, record, when)
        if record.cert in self._chains:  # "not fetched yet" must be asked again
            self._verdicts[key] = (self.generation, verdict)
        return verdict

    def _check(self, name: str, record: NodeRecord, now: int) -> Verdict:
        chain = self._chains.get(record.cert)
        if chain is None:
            reason = PENDING if record.cert else "no certificate"
            return Verdict(False, reason)
        try:
            issuer = chain.verify(self.roots, now, revoked=self.revoked)
        except IdentityError as exc:
            return Verdict(False, str(exc))
        node = chain.node
        if node.name != name:
            return Verdict(False, f"its certificate is for {node.name!r}, not {name!r}")
        if node.public_key != record.public_key:
            return Verdict(False, "its certificate binds another WireGuard key")
        expires = min(c.not_after for c in (node, *chain.issuers))
        return Verdict(True, None, tuple(node.addresses), expires, issuer)

    # --- revocations ----------------------------------------------------------

    def add_revocation(self, data: bytes) -> Revocation | None:
        """Verify and keep one encoded revocation; the revocation when it was new."""
        revocation = Revocation.decode(data)
        return revocation if self.add(revocation) else None

    def add(self, revocation: Revocation) -> bool:
        if not self.revoked.add(revocation, self.roots):
            return False
        self._apply_retirements()
        self.generation += 1
        self._save(self._path, self.revoked.encode())
        return True

    # --- route grants -----------------------------------------------------------

    def add_grant(self, data: bytes) -> RouteGrant | None:
        """Verify and keep one encoded route grant; the grant when it was new."""
        grant = RouteGrant.decode(data)
        if not self.grants.add(grant, self.roots):
            return None
        self.generation += 1
        self._save(self._grants_path, self.grants.encode())
        return grant

    # --- plain WireGuard clients -------------------------------------------------

    def add_client(self, data: bytes) -> ClientRecord | None:
        """Verify and keep one client record (the newest per name); the record when new."""
        record = ClientRecord.decode(data)
        verify_client(record, self.roots)
        held = self._clients.get(record.name)
        if held is not None and (held.issued_at, held.encode()) >= (record.issued_at, data):
            return None
        self._clients[record.name] = record
        self.generation += 1
        writer = BinaryWriter().header(_CLIENT_LIST_MAGIC, 1).u32(len(self._clients))
        for kept in self._clients.values():
            writer.long_bytes(kept.encode())
        self._save(self._clients_path, writer.getvalue())
        return record

    def clients(self) -> tuple[ClientRecord, ...]:
        """The clients in force: the newest record of each name, its key not revoked."""
        return tuple(
            c for c in self._clients.values() if not self.revoked.revokes_key(c.public_key)
        )

    def _load(self) -> None:
        # Refusing to start on a damaged file would be worse: log loudly, keep what
        # gossip re-teaches.
        data = _read_if_there(self._path)
        if data is not None:
            try:
                self.revoked = RevocationList.decode(data, self.roots)
            except IdentityError as exc:
                log.error("%s is damaged (%s); starting with no revocations", self._path, exc)
        data = _read_if_there(self._clients_path)
        if data is not None:
            try:
                reader = BinaryReader(data, "client list")
                reader.header(_CLIENT_LIST_MAGIC, 1)
                for _ in range(reader.u32()):
                    self.add_client(reader.long_bytes())
            except (DecodeError, IdentityError) as exc:
                log.error("%s is damaged (%s); some clients are missing", self._clients_path, exc)
        data = _read_if_there(self._grants_path)
        if data is not None:
            try:
                self.grants = GrantList.decode(data, self.roots)
            except IdentityError as exc:
                log.error(
                    "%s is damaged (%s); starting with no route grants", self._grants_path, exc
                )

    def digest(self) -> str:
        """A short digest of the revocations and grants held ("" for none): equal digests,
        equal lists."""
        items = self._statements()
        if not items:
            return ""
        encoded = b"".join(sorted(items))
        return base64.urlsafe_b64encode(hashlib.sha256(encoded).digest()[:9]).decode("ascii")

    def page(self, number: int) -> bytes:
        """Page ``number`` of the revocations and grants, for a Serf query answer: count,
        then items."""
        items = self._statements()
        chunk = items[number * REVOCATIONS_PER_PAGE : (number + 1) * REVOCATIONS_PER_PAGE]
        writer = BinaryWriter().u16(len(items))
        for item in chunk:
            writer.long_bytes(item)
        return writer.getvalue()

    def _statements(self) -> list[bytes]:
        return (
            [r.encode() for r in self.revoked]
            + [g.encode() for g in self.grants]
            + [c.encode() for c in self._clients.values()]
        )

    def merge_page(self, data: bytes) -> tuple[int, int]:
        """Add the revocations and grants of one answered page; (how many were new, their
        total there)."""
        reader = BinaryReader(data, "revocation page")
        added = 0
        try:
            total = reader.u16()
            while reader.remaining:
                item = reader.long_bytes()
                if item.startswith(GRANT_MAGIC):
                    new: object = self.add_grant(item)
                elif item.startswith(CLIENT_MAGIC):
                    new = self.add_client(item)
                else:
                    new = self.add_revocation(item)
                if new is not None:
                    added += 1
        except DecodeError as exc:
            raise IdentityError(str(exc)) from exc
        return added, total


def _read_if_there(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
