"""Node identity and the cryptography of the admission handshake (sans-IO).

A node is its **Ed25519 key pair**. The key lives in ``<data_dir>/node.key`` (PEM, PKCS#8,
unencrypted, file mode 0600), is created on first start and never changes after. The node's
name on the mesh is ``node_id = blake3(raw 32-byte public key)``, 32 bytes. The TLS
certificate the node presents on QUIC is not stored: it is regenerated from the key at every
load (self-signed, subject CN = node_id hex, valid from now - 1 day for 10 years). Nobody
checks it against a CA; what a peer pins is the certificate's *key*, by hashing it to the
node_id it expected (``check_server_certificate``). TLS itself proves the server holds the
matching private key (the CertificateVerify signature), so the dialer knows it reached the
node it named, and nobody in between can read or alter the connection.

The server learns who the dialer is from a **signed hello** on the connection (TLS client
certificates are not used). The server sends a fresh 32-byte ``server_nonce`` per
connection; the dialer signs the transcript

    b"macula/hello/v1\\x00" || lp(server_id) || lp(client_id) || lp(realm utf-8)
                           || lp(server_nonce) || lp(client_nonce)

(``lp`` = 2-byte big-endian length, then the bytes), so a signature is good for exactly one
connection to exactly one server in one realm: replaying it elsewhere, or on a later
connection, fails. A realm with a secret also asks for ``HMAC-SHA256(secret, transcript)``.
The messages that carry all this are described in ``docs/WIRE.md``.

Costs (medians on the 2-core dev box, OpenSSL via ``cryptography``): one Ed25519 signature
(~20 us) per dial; one verification (~60 us) and one blake3 of 32 bytes per accepted
connection; key generation plus the certificate (~70 us) once per process. Everything here
is pure computation: no sockets, no clocks except the certificate's validity window
(``make_certificate(now=...)`` for tests).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import hmac
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from blake3 import blake3
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

__all__ = [
    "ADMIT_BAD_HELLO",
    "ADMIT_BAD_IDENTITY",
    "ADMIT_BAD_SIGNATURE",
    "ADMIT_REALM_PROOF",
    "ADMIT_UNKNOWN_REALM",
    "ADMIT_WRONG_PEER",
    "HELLO_LABEL",
    "KEY_FILE_NAME",
    "MAX_REALM_BYTES",
    "NODE_ID_SIZE",
    "NONCE_SIZE",
    "PUBLIC_KEY_SIZE",
    "REALM_PROOF_SIZE",
    "SIGNATURE_SIZE",
    "AdmissionError",
    "IdentityError",
    "NodeIdentity",
    "check_realm_proof",
    "check_server_certificate",
    "hello_transcript",
    "make_certificate",
    "new_nonce",
    "node_id_of",
    "node_id_of_certificate",
    "public_key_of_certificate",
    "realm_proof",
    "server_node_id",
    "sign_hello",
    "verify_hello",
]

# Admission error codes; the peer wire also uses them as QUIC application close codes.
ADMIT_BAD_HELLO = 0x101  # malformed hello: wrong types, bad sizes, not a usable key
ADMIT_BAD_IDENTITY = 0x102  # public key does not hash to the claimed node_id
ADMIT_BAD_SIGNATURE = 0x103  # signature does not verify (forged or replayed hello)
ADMIT_UNKNOWN_REALM = 0x104  # realm not served by this node
ADMIT_REALM_PROOF = 0x105  # missing or wrong realm proof
ADMIT_WRONG_PEER = 0x106  # server's certificate key does not hash to the expected node_id

NODE_ID_SIZE = 32
NONCE_SIZE = 32
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
REALM_PROOF_SIZE = 32
MAX_REALM_BYTES = 255
KEY_FILE_NAME = "node.key"
HELLO_LABEL = b"macula/hello/v1\x00"

CERT_BACKDATE = datetime.timedelta(days=1)
CERT_LIFETIME = datetime.timedelta(days=3653)  # 10 years, leap days included

# Ed25519 public keys of small order (the y coordinates of the 8 torsion points; the sign
# bit of x is ignored). OpenSSL accepts them, and for the identity point a signature
# (R = identity, S = 0) verifies for *every* message, so anyone could act as the node_id
# such a key hashes to. Same list as libsodium's blocklist; tests re-derive it.
_P = 2**255 - 19
_SMALL_ORDER_Y = frozenset(
    {
        0,
        1,
        _P - 1,
        2707385501144840649318225287225658788936804267575313519463743609750303402022,
        55188659117513257062467267217118295137698188065244968500265048394206261417927,
    }
)


class IdentityError(Exception):
    """The node key cannot be used: unreadable, corrupt, wrong key type, unsafe permissions."""


class AdmissionError(Exception):
    """A peer is refused; ``code`` is one of the ``ADMIT_*`` codes, ``reason`` says why."""

    code: int
    reason: str

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason} (admission code 0x{self.code:x})"


# --------------------------------------------------------------------------- node ids


def node_id_of(public_key: bytes) -> bytes:
    """The node_id of a raw 32-byte Ed25519 public key: its blake3 hash (32 bytes)."""
    if not isinstance(public_key, bytes):
        raise TypeError(f"public_key must be bytes, not {type(public_key).__name__}")
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise ValueError(f"an Ed25519 public key is {PUBLIC_KEY_SIZE} bytes, got {len(public_key)}")
    return bytes(blake3(public_key).digest())


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


_KINDS: tuple[tuple[tuple[type, ...], str], ...] = (
    ((rsa.RSAPrivateKey, rsa.RSAPublicKey), "an RSA"),
    ((ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey), "an EC"),
    ((ed448.Ed448PrivateKey, ed448.Ed448PublicKey), "an Ed448"),
    ((dsa.DSAPrivateKey, dsa.DSAPublicKey), "a DSA"),
)


def _kind(key: object) -> str:
    """'an RSA', 'an EC', ... for error messages."""
    for classes, name in _KINDS:
        if isinstance(key, classes):
            return name
    return f"a {type(key).__name__}"


def public_key_of_certificate(cert: x509.Certificate) -> bytes:
    """The raw 32-byte Ed25519 key of ``cert``; ``IdentityError`` for any other key type."""
    try:
        key = cert.public_key()
    except (UnsupportedAlgorithm, ValueError) as exc:
        raise IdentityError(f"certificate key cannot be read: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise IdentityError(f"certificate holds {_kind(key)} key; macula node keys are Ed25519")
    return _raw_public(key)


def node_id_of_certificate(cert: x509.Certificate) -> bytes:
    """The node_id of the key in ``cert`` (``IdentityError`` if it is not Ed25519)."""
    return node_id_of(public_key_of_certificate(cert))


def server_node_id(cert: x509.Certificate | None) -> bytes:
    """Dialer side: the node_id of the server's certificate key (a seed dialled by address
    learns who it reached this way). ``AdmissionError(ADMIT_WRONG_PEER, ...)`` for no
    certificate or a non-Ed25519 key."""
    if cert is None:
        raise AdmissionError(ADMIT_WRONG_PEER, "server presented no certificate")
    try:
        return node_id_of_certificate(cert)
    except IdentityError as exc:
        raise AdmissionError(ADMIT_WRONG_PEER, f"server certificate: {exc}") from None


def check_server_certificate(cert: x509.Certificate | None, expected: bytes) -> None:
    """Dialer side: refuse unless the server's certificate key hashes to ``expected``.

    ``cert`` is the certificate TLS received (aioquic: ``connection.tls._peer_certificate``);
    TLS has already checked that the server holds its private key. Raises
    ``AdmissionError(ADMIT_WRONG_PEER, ...)`` on mismatch, no certificate, or a non-Ed25519 key.
    """
    if not isinstance(expected, bytes) or len(expected) != NODE_ID_SIZE:
        raise ValueError(f"expected must be a {NODE_ID_SIZE}-byte node_id")
    got = server_node_id(cert)
    if not hmac.compare_digest(got, expected):
        raise AdmissionError(
            ADMIT_WRONG_PEER,
            f"server is node {got.hex()}, expected node {expected.hex()}",
        )


# --------------------------------------------------------------------------- the key pair


def make_certificate(
    private_key: Ed25519PrivateKey, *, now: datetime.datetime | None = None
) -> x509.Certificate:
    """A self-signed certificate for ``private_key``: CN = node_id hex, now-1 day .. +10 y."""
    if now is None:
        now = datetime.datetime.now(datetime.timezone.utc)
    node_id = node_id_of(_raw_public(private_key.public_key()))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id.hex())])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CERT_BACKDATE)
        .not_valid_after(now + CERT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(private_key, algorithm=None)
    )


@dataclass(frozen=True, eq=False, repr=False)
class NodeIdentity:
    """A node's key pair, node_id and TLS certificate.

    Build with ``generate()`` (ephemeral) or ``load_or_create(data_dir)`` (persistent).
    Equality is identity of the object; compare ``node_id`` to compare nodes.
    """

    private_key: Ed25519PrivateKey
    public_key: bytes  # raw 32
    node_id: bytes  # 32
    certificate: x509.Certificate
    created: bool = False  # load_or_create made the key file just now (a first start)

    def __post_init__(self) -> None:
        if not isinstance(self.private_key, Ed25519PrivateKey):
            raise IdentityError("a node key must be an Ed25519 private key")
        if self.public_key != _raw_public(self.private_key.public_key()):
            raise IdentityError("public_key does not belong to private_key")
        if self.node_id != node_id_of(self.public_key):
            raise IdentityError("node_id is not blake3(public_key)")
        if public_key_of_certificate(self.certificate) != self.public_key:
            raise IdentityError("certificate key is not the node key")

    @classmethod
    def _from_private_key(cls, private_key: Ed25519PrivateKey,
                          created: bool = False) -> NodeIdentity:
        public_key = _raw_public(private_key.public_key())
        return cls(
            private_key=private_key,
            public_key=public_key,
            node_id=node_id_of(public_key),
            certificate=make_certificate(private_key),
            created=created,
        )

    @classmethod
    def generate(cls) -> NodeIdentity:
        """A fresh identity that is not saved anywhere (tests, demos)."""
        return cls._from_private_key(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, data_dir: str | os.PathLike[str]) -> NodeIdentity:
        """Load ``data_dir/node.key``, creating it (and ``data_dir``, mode 0700) if missing.

        Raises ``IdentityError``, naming the file, when it is not a regular file, is
        accessible by group or others (fix: ``chmod 600``), cannot be read, is not a PEM
        private key, is encrypted, or holds a key that is not Ed25519.
        """
        directory = Path(data_dir)
        path = directory / KEY_FILE_NAME
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise IdentityError(f"cannot create data directory {directory}: {exc}") from None
        created = not os.path.lexists(path)
        if created:
            _create_key_file(path)
        return cls._from_private_key(_load_key_file(path), created)

    def sign(self, data: bytes) -> bytes:
        """Ed25519 signature (64 bytes) of ``data``. Signed data must start with a domain
        label (the hello's is ``HELLO_LABEL``) so a signature means one thing only."""
        return self.private_key.sign(data)

    @property
    def node_id_hex(self) -> str:
        return self.node_id.hex()

    def __repr__(self) -> str:
        return f"NodeIdentity(node_id={self.node_id_hex})"


def _create_key_file(path: Path) -> None:
    """Write a new key to ``path`` atomically: a 0600 temp file, fsync, then a hard link
    (which fails if another process created the key first; its key then wins)."""
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    except OSError as exc:
        raise IdentityError(f"cannot create node key {path}: {exc}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _load_key_file(path: Path) -> Ed25519PrivateKey:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise IdentityError(f"cannot read node key {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise IdentityError(f"node key {path} is not a regular file")
    if os.name == "posix" and st.st_mode & 0o077:
        raise IdentityError(
            f"node key {path} is accessible by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run `chmod 600 {path}`"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"cannot read node key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise IdentityError(
            f"node key {path} is encrypted; macula needs an unencrypted PKCS#8 PEM key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise IdentityError(
            f"node key {path} is not a PEM private key (corrupt?); move it away to make a "
            "new identity"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"node key {path} holds {_kind(key)} key; macula node keys are Ed25519")
    return key


def new_nonce() -> bytes:
    """A fresh random 32-byte nonce (``os.urandom``)."""
    return os.urandom(NONCE_SIZE)


# --------------------------------------------------------------------------- the hello


def _bad(reason: str) -> AdmissionError:
    return AdmissionError(ADMIT_BAD_HELLO, reason)


def _check_bytes(name: str, value: object, size: int) -> bytes:
    if not isinstance(value, bytes):
        raise _bad(f"{name} must be bytes, not {type(value).__name__}")
    if len(value) != size:
        raise _bad(f"{name} must be {size} bytes, got {len(value)}")
    return value


def _realm_bytes(realm: object) -> bytes:
    if not isinstance(realm, str):
        raise _bad(f"realm must be str, not {type(realm).__name__}")
    try:
        raw = realm.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad("realm is not valid UTF-8 text") from None
    if not 1 <= len(raw) <= MAX_REALM_BYTES:
        raise _bad(f"realm must be 1 to {MAX_REALM_BYTES} UTF-8 bytes, got {len(raw)}")
    return raw


def hello_transcript(
    *,
    server_id: bytes,
    client_id: bytes,
    realm: str,
    server_nonce: bytes,
    client_nonce: bytes,
) -> bytes:
    """The bytes the dialer signs (and MACs with the realm secret) to be admitted.

    ``HELLO_LABEL`` then each field as a 2-byte big-endian length and its bytes, in the
    order server_id, client_id, realm (UTF-8), server_nonce, client_nonce. Ids and nonces
    must be 32 bytes, the realm 1..255 UTF-8 bytes; otherwise ``ADMIT_BAD_HELLO``.
    """
    fields = (
        _check_bytes("server_id", server_id, NODE_ID_SIZE),
        _check_bytes("client_id", client_id, NODE_ID_SIZE),
        _realm_bytes(realm),
        _check_bytes("server_nonce", server_nonce, NONCE_SIZE),
        _check_bytes("client_nonce", client_nonce, NONCE_SIZE),
    )
    parts = [HELLO_LABEL]
    for field in fields:
        parts.append(len(field).to_bytes(2, "big"))
        parts.append(field)
    return b"".join(parts)


def _check_transcript(transcript: object) -> bytes:
    if not isinstance(transcript, bytes):
        raise _bad(f"transcript must be bytes, not {type(transcript).__name__}")
    if not transcript.startswith(HELLO_LABEL):
        raise _bad("transcript does not start with the hello label")
    return transcript


def sign_hello(identity: NodeIdentity, transcript: bytes) -> bytes:
    """The dialer's 64-byte signature of a ``hello_transcript``."""
    return identity.sign(_check_transcript(transcript))


def _usable_public_key(public_key: bytes) -> Ed25519PublicKey:
    y = int.from_bytes(public_key, "little") & ~(1 << 255)
    if y >= _P:
        raise _bad("public key is not canonically encoded")
    if y in _SMALL_ORDER_Y:
        raise _bad("public key has small order")
    try:
        return Ed25519PublicKey.from_public_bytes(public_key)
    except ValueError:
        raise _bad("public key is not an Ed25519 point") from None


def verify_hello(*, public_key: bytes, node_id: bytes, transcript: bytes, signature: bytes) -> None:
    """Server side: accept the hello or raise ``AdmissionError``.

    Sizes and types first (``ADMIT_BAD_HELLO``), then ``node_id_of(public_key) == node_id``
    (``ADMIT_BAD_IDENTITY``), then the signature over ``transcript`` (``ADMIT_BAD_SIGNATURE``).
    The caller builds ``transcript`` itself with its own id and the nonce it sent on this
    connection; it never takes a transcript from the peer.
    """
    _check_bytes("public_key", public_key, PUBLIC_KEY_SIZE)
    _check_bytes("node_id", node_id, NODE_ID_SIZE)
    _check_bytes("signature", signature, SIGNATURE_SIZE)
    _check_transcript(transcript)
    key = _usable_public_key(public_key)
    if not hmac.compare_digest(node_id_of(public_key), node_id):
        raise AdmissionError(
            ADMIT_BAD_IDENTITY, f"public key does not hash to node {node_id.hex()}"
        )
    try:
        key.verify(signature, transcript)
    except InvalidSignature:
        raise AdmissionError(
            ADMIT_BAD_SIGNATURE, "hello signature does not verify for this connection"
        ) from None


# --------------------------------------------------------------------------- realms


def _check_secret(secret: object) -> bytes:
    if not isinstance(secret, bytes):
        raise TypeError(f"realm secret must be bytes, not {type(secret).__name__}")
    if not secret:
        raise ValueError("a realm secret must not be empty (use None for an open realm)")
    return secret


def realm_proof(secret: bytes, transcript: bytes) -> bytes:
    """Proof of the realm secret for this hello: HMAC-SHA256(secret, transcript), 32 bytes."""
    return hmac.new(_check_secret(secret), _check_transcript(transcript), hashlib.sha256).digest()


def check_realm_proof(secret: bytes | None, transcript: bytes, proof: bytes | None) -> None:
    """Server side: ``secret`` None means an open realm (any proof is ignored); otherwise
    ``proof`` must equal ``realm_proof(secret, transcript)`` (constant-time compare), else
    ``ADMIT_REALM_PROOF``. A proof of the wrong type is ``ADMIT_BAD_HELLO``."""
    if secret is None:
        return
    if proof is not None and not isinstance(proof, bytes):
        raise _bad(f"realm proof must be bytes or nil, not {type(proof).__name__}")
    expected = realm_proof(secret, transcript)
    if proof is None:
        raise AdmissionError(ADMIT_REALM_PROOF, "realm needs a proof of its secret")
    if not hmac.compare_digest(proof, expected):
        raise AdmissionError(ADMIT_REALM_PROOF, "wrong realm proof")
