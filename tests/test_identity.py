"""Node identity and admission-handshake cryptography (macula.wire.identity).

Real keys, real files, and a real in-memory QUIC handshake (aioquic, datagrams passed by
hand) to show that the certificate made from the node key is accepted and pinned by node_id.
"""

from __future__ import annotations

import datetime
import os
import pickle
import shutil
import ssl
import stat
import tempfile
from pathlib import Path

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted
from blake3 import blake3
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from macula.wire import identity as ident
from macula.wire.identity import (
    ADMIT_BAD_HELLO,
    ADMIT_BAD_IDENTITY,
    ADMIT_BAD_SIGNATURE,
    ADMIT_REALM_PROOF,
    ADMIT_WRONG_PEER,
    AdmissionError,
    IdentityError,
    NodeIdentity,
    check_realm_proof,
    check_server_certificate,
    hello_transcript,
    make_certificate,
    new_nonce,
    node_id_of,
    node_id_of_certificate,
    public_key_of_certificate,
    realm_proof,
    sign_hello,
    verify_hello,
)

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

SERVER = NodeIdentity.generate()
CLIENT = NodeIdentity.generate()
OTHER = NodeIdentity.generate()


def _transcript(**overrides: object) -> bytes:
    fields: dict[str, object] = {
        "server_id": SERVER.node_id,
        "client_id": CLIENT.node_id,
        "realm": "prod",
        "server_nonce": b"s" * 32,
        "client_nonce": b"c" * 32,
    }
    fields.update(overrides)
    return hello_transcript(**fields)  # type: ignore[arg-type]


def _code(exc_info: pytest.ExceptionInfo[AdmissionError]) -> int:
    return exc_info.value.code


# --------------------------------------------------------------------------- key file


def test_load_or_create_makes_a_0600_key_and_reloads_the_same_identity(tmp_path: Path) -> None:
    data_dir = tmp_path / "a" / "b"
    first = NodeIdentity.load_or_create(data_dir)
    key_file = data_dir / "node.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert key_file.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert sorted(p.name for p in data_dir.iterdir()) == ["node.key"]  # no temp file left

    pem = key_file.read_bytes()
    second = NodeIdentity.load_or_create(str(data_dir))
    assert second.node_id == first.node_id
    assert second.public_key == first.public_key
    assert key_file.read_bytes() == pem  # not rewritten
    assert len(first.node_id) == 32
    assert first.node_id == blake3(first.public_key).digest()
    assert first.node_id_hex == first.node_id.hex()
    assert repr(first) == f"NodeIdentity(node_id={first.node_id_hex})"


def test_an_existing_key_file_is_never_overwritten(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "node.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    before = path.read_bytes()
    loaded = NodeIdentity.load_or_create(tmp_path)
    assert path.read_bytes() == before
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert loaded.public_key == raw


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o620, 0o644])
def test_a_key_file_open_to_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    NodeIdentity.load_or_create(tmp_path)
    path = tmp_path / "node.key"
    path.chmod(mode)
    with pytest.raises(IdentityError) as exc_info:
        NodeIdentity.load_or_create(tmp_path)
    message = str(exc_info.value)
    assert str(path) in message
    assert f"chmod 600 {path}" in message
    path.chmod(0o600)
    assert len(NodeIdentity.load_or_create(tmp_path).node_id) == 32


def _load_error_as_nobody(directory: Path) -> str:
    """Run load_or_create in a forked child that dropped root (uid/gid 65534); its error."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery from here on, only os._exit
        code = 0
        try:
            os.close(read_end)
            os.setgid(65534)
            os.setuid(65534)
            try:
                NodeIdentity.load_or_create(directory)
                message = "loaded"
            except IdentityError as exc:
                message = "IdentityError: " + str(exc)
            os.write(write_end, message.encode())
        except BaseException:
            code = 1
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        out = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    return out


def test_an_unreadable_key_file_is_a_clear_error(tmp_path: Path) -> None:
    if not IS_ROOT:
        NodeIdentity.load_or_create(tmp_path)
        path = tmp_path / "node.key"
        path.chmod(0o000)
        try:
            with pytest.raises(IdentityError, match="cannot read node key"):
                NodeIdentity.load_or_create(tmp_path)
        finally:
            path.chmod(0o600)
        return
    # As root a mode-000 file stays readable: test it from a process that is not root, in a
    # directory that process may enter (pytest's tmp_path is private to root).
    directory = Path(tempfile.mkdtemp(prefix="macula-unreadable-"))
    try:
        directory.chmod(0o755)
        NodeIdentity.load_or_create(directory)
        path = directory / "node.key"
        path.chmod(0o000)
        message = _load_error_as_nobody(directory)
        assert message.startswith("IdentityError: cannot read node key"), message
        assert str(path) in message
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _write_key_file(directory: Path, data: bytes) -> Path:
    path = directory / "node.key"
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def test_a_corrupt_key_file_is_a_clear_error(tmp_path: Path) -> None:
    path = _write_key_file(tmp_path, b"-----BEGIN PRIVATE KEY-----\ngarbage\n")
    with pytest.raises(IdentityError, match="not a PEM private key") as exc_info:
        NodeIdentity.load_or_create(tmp_path)
    assert str(path) in str(exc_info.value)
    assert path.read_bytes().endswith(b"garbage\n")  # left alone for the operator


def test_an_empty_key_file_is_a_clear_error(tmp_path: Path) -> None:
    _write_key_file(tmp_path, b"")
    with pytest.raises(IdentityError, match="not a PEM private key"):
        NodeIdentity.load_or_create(tmp_path)


def test_a_directory_in_place_of_the_key_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "node.key").mkdir()
    with pytest.raises(IdentityError, match="is not a regular file"):
        NodeIdentity.load_or_create(tmp_path)


def test_a_dangling_symlink_in_place_of_the_key_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "node.key").symlink_to(tmp_path / "nowhere")
    with pytest.raises(IdentityError, match="cannot read node key"):
        NodeIdentity.load_or_create(tmp_path)
    assert not (tmp_path / "nowhere").exists()


def test_a_key_of_another_type_is_refused(tmp_path: Path) -> None:
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_key_file(tmp_path, pem)
    with pytest.raises(IdentityError, match="holds an EC key; macula node keys are Ed25519"):
        NodeIdentity.load_or_create(tmp_path)


def test_an_encrypted_key_is_refused(tmp_path: Path) -> None:
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    _write_key_file(tmp_path, pem)
    with pytest.raises(IdentityError, match="encrypted"):
        NodeIdentity.load_or_create(tmp_path)


def test_a_data_dir_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"")
    with pytest.raises(IdentityError, match="cannot create data directory"):
        NodeIdentity.load_or_create(not_a_dir)


def test_an_inconsistent_identity_cannot_be_built() -> None:
    with pytest.raises(IdentityError, match="does not belong"):
        NodeIdentity(SERVER.private_key, CLIENT.public_key, CLIENT.node_id, CLIENT.certificate)
    with pytest.raises(IdentityError, match="node_id"):
        NodeIdentity(SERVER.private_key, SERVER.public_key, CLIENT.node_id, SERVER.certificate)
    with pytest.raises(IdentityError, match="certificate key"):
        NodeIdentity(SERVER.private_key, SERVER.public_key, SERVER.node_id, CLIENT.certificate)


# --------------------------------------------------------------------------- certificate


def test_the_certificate_key_hashes_to_the_node_id() -> None:
    cert = SERVER.certificate
    assert public_key_of_certificate(cert) == SERVER.public_key
    assert node_id_of_certificate(cert) == SERVER.node_id
    assert node_id_of(SERVER.public_key) == SERVER.node_id
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == SERVER.node_id_hex
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)  # self-signed with the node key


def test_the_certificate_validity_window() -> None:
    now = datetime.datetime(2030, 6, 1, 12, 0, tzinfo=datetime.timezone.utc)
    cert = make_certificate(SERVER.private_key, now=now)
    assert cert.not_valid_before_utc == now - datetime.timedelta(days=1)
    assert cert.not_valid_after_utc - now >= datetime.timedelta(days=365 * 10)
    assert cert.not_valid_after_utc - now < datetime.timedelta(days=365 * 10 + 5)


def test_a_non_ed25519_certificate_is_refused() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, algorithm=hashes.SHA256())
    )
    with pytest.raises(IdentityError, match="Ed25519"):
        public_key_of_certificate(cert)
    with pytest.raises(AdmissionError) as exc_info:
        check_server_certificate(cert, SERVER.node_id)
    assert _code(exc_info) == ADMIT_WRONG_PEER


def test_check_server_certificate_pins_by_node_id() -> None:
    check_server_certificate(SERVER.certificate, SERVER.node_id)
    with pytest.raises(AdmissionError) as exc_info:
        check_server_certificate(SERVER.certificate, OTHER.node_id)
    assert _code(exc_info) == ADMIT_WRONG_PEER
    assert SERVER.node_id_hex in exc_info.value.reason
    assert OTHER.node_id_hex in exc_info.value.reason
    with pytest.raises(AdmissionError) as exc_info:
        check_server_certificate(None, SERVER.node_id)
    assert _code(exc_info) == ADMIT_WRONG_PEER
    with pytest.raises(ValueError, match="32-byte node_id"):
        check_server_certificate(SERVER.certificate, SERVER.node_id[:31])


CLIENT_ADDR = ("1.2.3.4", 1234)
SERVER_ADDR = ("2.3.4.5", 4433)


def _quic_handshake(
    certificate: x509.Certificate, private_key: Ed25519PrivateKey
) -> tuple[QuicConnection, list[object]]:
    """Client and server QuicConnection in memory, datagrams passed by hand, fake clock."""
    server_config = QuicConfiguration(is_client=False, alpn_protocols=["macula/1"])
    server_config.certificate = certificate
    server_config.private_key = private_key
    client_config = QuicConfiguration(
        is_client=True, alpn_protocols=["macula/1"], verify_mode=ssl.CERT_NONE
    )
    client = QuicConnection(configuration=client_config)
    server = QuicConnection(
        configuration=server_config,
        original_destination_connection_id=client.original_destination_connection_id,
    )
    now = 1.0
    client.connect(SERVER_ADDR, now=now)
    for _ in range(20):
        moved = 0
        for data, _addr in client.datagrams_to_send(now=now):
            server.receive_datagram(data, CLIENT_ADDR, now=now)
            moved += 1
        for data, _addr in server.datagrams_to_send(now=now):
            client.receive_datagram(data, SERVER_ADDR, now=now)
            moved += 1
        if not moved:
            break
        now += 0.01
    events: list[object] = []
    while (event := client.next_event()) is not None:
        events.append(event)
    return client, events


def test_aioquic_accepts_the_certificate_and_the_client_pins_it() -> None:
    client, events = _quic_handshake(SERVER.certificate, SERVER.private_key)
    completed = [e for e in events if isinstance(e, HandshakeCompleted)]
    assert len(completed) == 1
    assert completed[0].alpn_protocol == "macula/1"
    peer_cert = client.tls._peer_certificate
    assert peer_cert is not None
    assert node_id_of_certificate(peer_cert) == SERVER.node_id
    check_server_certificate(peer_cert, SERVER.node_id)
    with pytest.raises(AdmissionError) as exc_info:
        check_server_certificate(peer_cert, OTHER.node_id)
    assert _code(exc_info) == ADMIT_WRONG_PEER


def test_a_server_showing_a_certificate_without_its_key_fails_tls() -> None:
    # An impostor presents the real node's certificate but cannot sign with its key:
    # TLS (CertificateVerify) refuses it even with verify_mode CERT_NONE.
    client, events = _quic_handshake(SERVER.certificate, OTHER.private_key)
    assert not any(isinstance(e, HandshakeCompleted) for e in events)
    for _ in range(10):  # let the closing period run out on the fake clock
        timer = client.get_timer()
        if timer is None:
            break
        client.handle_timer(now=timer)
    while (event := client.next_event()) is not None:
        events.append(event)
    terminated = [e for e in events if isinstance(e, ConnectionTerminated)]
    assert len(terminated) == 1
    assert terminated[0].error_code == 0x100 + 51  # TLS alert decrypt_error


# --------------------------------------------------------------------------- hello


def test_hello_round_trip() -> None:
    transcript = _transcript()
    signature = sign_hello(CLIENT, transcript)
    assert len(signature) == 64
    verify_hello(
        public_key=CLIENT.public_key,
        node_id=CLIENT.node_id,
        transcript=transcript,
        signature=signature,
    )


def test_transcript_layout() -> None:
    transcript = _transcript(realm="é")
    expected = (
        b"macula/hello/v1\x00"
        + b"\x00\x20"
        + SERVER.node_id
        + b"\x00\x20"
        + CLIENT.node_id
        + b"\x00\x02"
        + "é".encode()
        + b"\x00\x20"
        + b"s" * 32
        + b"\x00\x20"
        + b"c" * 32
    )
    assert transcript == expected


def test_an_impostor_key_claiming_another_node_id_is_refused() -> None:
    transcript = _transcript()  # names CLIENT.node_id as the client
    signature = sign_hello(OTHER, transcript)
    with pytest.raises(AdmissionError) as exc_info:
        verify_hello(
            public_key=OTHER.public_key,
            node_id=CLIENT.node_id,
            transcript=transcript,
            signature=signature,
        )
    assert _code(exc_info) == ADMIT_BAD_IDENTITY


def test_a_forged_signature_with_the_real_public_key_is_refused() -> None:
    transcript = _transcript()
    signature = sign_hello(OTHER, transcript)
    with pytest.raises(AdmissionError) as exc_info:
        verify_hello(
            public_key=CLIENT.public_key,
            node_id=CLIENT.node_id,
            transcript=transcript,
            signature=signature,
        )
    assert _code(exc_info) == ADMIT_BAD_SIGNATURE


def _verify_code(signed: bytes, checked: bytes) -> int | None:
    try:
        verify_hello(
            public_key=CLIENT.public_key,
            node_id=CLIENT.node_id,
            transcript=checked,
            signature=sign_hello(CLIENT, signed),
        )
    except AdmissionError as exc:
        return exc.code
    return None


def test_a_replayed_auth_fails_on_a_new_server_nonce() -> None:
    old = _transcript(server_nonce=b"\x01" * 32)
    new = _transcript(server_nonce=b"\x02" * 32)
    assert _verify_code(old, new) == ADMIT_BAD_SIGNATURE


def test_an_auth_made_for_one_server_fails_at_another() -> None:
    for_x = _transcript(server_id=OTHER.node_id)
    at_y = _transcript(server_id=SERVER.node_id)
    assert _verify_code(for_x, at_y) == ADMIT_BAD_SIGNATURE


def test_a_tampered_realm_fails() -> None:
    assert _verify_code(_transcript(realm="dev"), _transcript(realm="prod")) == ADMIT_BAD_SIGNATURE


def test_a_changed_client_nonce_fails() -> None:
    signed = _transcript(client_nonce=b"\x01" * 32)
    assert _verify_code(signed, _transcript()) == ADMIT_BAD_SIGNATURE


_ids = st.sampled_from([SERVER.node_id, CLIENT.node_id, OTHER.node_id])
_nonces = st.binary(min_size=32, max_size=32)
_realms = st.text(min_size=1, max_size=20).filter(
    lambda s: (
        1 <= len(s.encode("utf-8", "surrogatepass")) <= 255
        and not any(0xD800 <= ord(c) <= 0xDFFF for c in s)
    )
)
_hellos = st.fixed_dictionaries(
    {
        "server_id": _ids,
        "client_id": _ids,
        "realm": _realms,
        "server_nonce": _nonces,
        "client_nonce": _nonces,
    }
)


@given(_hellos, _hellos)
def test_a_signature_verifies_exactly_for_the_hello_it_was_made_for(
    a: dict[str, object], b: dict[str, object]
) -> None:
    ta = hello_transcript(**a)  # type: ignore[arg-type]
    tb = hello_transcript(**b)  # type: ignore[arg-type]
    assert (ta == tb) == (a == b)  # the encoding is unambiguous
    expected = None if a == b else ADMIT_BAD_SIGNATURE
    assert _verify_code(ta, tb) == expected


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("server_id", b"x" * 31),
        ("server_id", b"x" * 33),
        ("server_id", "x" * 32),
        ("server_id", bytearray(32)),
        ("client_id", None),
        ("client_id", b""),
        ("server_nonce", b"n" * 16),
        ("client_nonce", 7),
        ("realm", ""),
        ("realm", "r" * 256),
        ("realm", b"prod"),
        ("realm", "\ud800"),
    ],
)
def test_bad_transcript_fields_are_bad_hello(field: str, value: object) -> None:
    with pytest.raises(AdmissionError) as exc_info:
        _transcript(**{field: value})
    assert _code(exc_info) == ADMIT_BAD_HELLO
    assert field.split("_")[0] in exc_info.value.reason or "realm" in exc_info.value.reason


def test_a_255_byte_realm_is_allowed() -> None:
    assert len(_transcript(realm="r" * 255)) == 16 + 5 * 2 + 4 * 32 + 255


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("public_key", CLIENT.public_key[:31]),
        ("public_key", "k" * 32),
        ("node_id", CLIENT.node_id + b"\x00"),
        ("node_id", None),
        ("signature", b"\x00" * 63),
        ("signature", bytearray(64)),
        ("transcript", "hello"),
        ("transcript", b"not a hello transcript"),
    ],
)
def test_bad_verify_arguments_are_bad_hello(field: str, value: object) -> None:
    transcript = _transcript()
    args: dict[str, object] = {
        "public_key": CLIENT.public_key,
        "node_id": CLIENT.node_id,
        "transcript": transcript,
        "signature": sign_hello(CLIENT, transcript),
    }
    args[field] = value
    with pytest.raises(AdmissionError) as exc_info:
        verify_hello(**args)  # type: ignore[arg-type]
    assert _code(exc_info) == ADMIT_BAD_HELLO


def test_sign_hello_signs_only_hello_transcripts() -> None:
    with pytest.raises(AdmissionError) as exc_info:
        sign_hello(CLIENT, b"some other message")
    assert _code(exc_info) == ADMIT_BAD_HELLO


# Edwards25519, enough to re-derive the small-order keys that verify_hello refuses.
_P = 2**255 - 19
_D = -121665 * pow(121666, -1, _P) % _P


def _add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    (x1, y1), (x2, y2) = a, b
    t = _D * x1 * x2 * y1 * y2 % _P
    return (
        (x1 * y2 + x2 * y1) * pow(1 + t, -1, _P) % _P,
        (y1 * y2 + x1 * x2) * pow(1 - t, -1, _P) % _P,
    )


def _x_for(y: int) -> int | None:
    xx = (y * y - 1) * pow(_D * y * y + 1, -1, _P) % _P
    x = pow(xx, (_P + 3) // 8, _P)
    if (x * x - xx) % _P:
        x = x * pow(2, (_P - 1) // 4, _P) % _P
    return None if (x * x - xx) % _P else x


def test_the_small_order_blocklist_is_the_8_torsion() -> None:
    ys = ident._SMALL_ORDER_Y
    points = set()
    for y in ys:
        x = _x_for(y)
        assert x is not None
        for px in {x, -x % _P}:
            p = (px, y)
            q = p
            for _ in range(3):
                q = _add(q, q)
            assert q == (0, 1)  # [8]P is the identity
            points.add(p)
    assert len(points) == 8  # all of them: the torsion subgroup has 8 points


def test_small_order_and_non_canonical_keys_are_refused() -> None:
    # With the identity point as key, (R = identity, S = 0) verifies for ANY message.
    identity_key = (1).to_bytes(32, "little")
    universal = identity_key + bytes(32)
    Ed25519PublicKey.from_public_bytes(identity_key).verify(universal, b"anything")
    transcript = _transcript(client_id=node_id_of(identity_key))
    with pytest.raises(AdmissionError) as exc_info:
        verify_hello(
            public_key=identity_key,
            node_id=node_id_of(identity_key),
            transcript=transcript,
            signature=universal,
        )
    assert _code(exc_info) == ADMIT_BAD_HELLO
    for y in [*ident._SMALL_ORDER_Y, _P, _P + 1]:
        for sign in (0, 1 << 255):
            key = (y | sign).to_bytes(32, "little")
            with pytest.raises(AdmissionError) as exc_info:
                verify_hello(
                    public_key=key,
                    node_id=node_id_of(key),
                    transcript=transcript,
                    signature=universal,
                )
            assert _code(exc_info) == ADMIT_BAD_HELLO


# --------------------------------------------------------------------------- realm proof


def test_realm_proof_right_wrong_missing() -> None:
    transcript = _transcript()
    secret = b"realm secret"
    proof = realm_proof(secret, transcript)
    assert len(proof) == 32
    check_realm_proof(secret, transcript, proof)

    for bad in (realm_proof(b"other secret", transcript), proof[:-1] + bytes([proof[-1] ^ 1]), b""):
        with pytest.raises(AdmissionError) as exc_info:
            check_realm_proof(secret, transcript, bad)
        assert _code(exc_info) == ADMIT_REALM_PROOF
    with pytest.raises(AdmissionError) as exc_info:
        check_realm_proof(secret, transcript, None)
    assert _code(exc_info) == ADMIT_REALM_PROOF
    # a proof for another connection (other server nonce) does not carry over
    replayed = realm_proof(secret, _transcript(server_nonce=b"\x09" * 32))
    with pytest.raises(AdmissionError) as exc_info:
        check_realm_proof(secret, transcript, replayed)
    assert _code(exc_info) == ADMIT_REALM_PROOF
    with pytest.raises(AdmissionError) as exc_info:
        check_realm_proof(secret, transcript, "proof")  # type: ignore[arg-type]
    assert _code(exc_info) == ADMIT_BAD_HELLO


def test_an_open_realm_ignores_the_proof() -> None:
    transcript = _transcript()
    check_realm_proof(None, transcript, None)
    check_realm_proof(None, transcript, b"anything")


def test_realm_secret_must_be_non_empty_bytes() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        realm_proof(b"", _transcript())
    with pytest.raises(TypeError, match="must be bytes"):
        realm_proof("secret", _transcript())  # type: ignore[arg-type]


# --------------------------------------------------------------------------- misc


def test_admission_error_carries_code_and_reason_and_pickles() -> None:
    err = AdmissionError(ADMIT_REALM_PROOF, "wrong realm proof")
    assert (err.code, err.reason) == (0x105, "wrong realm proof")
    assert str(err) == "wrong realm proof (admission code 0x105)"
    back = pickle.loads(pickle.dumps(err))
    assert (back.code, back.reason) == (err.code, err.reason)


def test_nonces_are_fresh_32_bytes() -> None:
    nonces = {new_nonce() for _ in range(100)}
    assert len(nonces) == 100
    assert all(len(n) == 32 for n in nonces)


def test_identities_are_distinct() -> None:
    assert len({SERVER.node_id, CLIENT.node_id, OTHER.node_id}) == 3
    assert NodeIdentity.generate().node_id != NodeIdentity.generate().node_id


def test_losing_the_creation_race_keeps_the_other_key(tmp_path: Path) -> None:
    # Two processes starting at once: the second writer's hard link fails and its key is
    # dropped, so both load the key that won.
    winner = NodeIdentity.load_or_create(tmp_path)
    path = tmp_path / "node.key"
    pem = path.read_bytes()
    ident._create_key_file(path)
    assert path.read_bytes() == pem
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.key"]
    assert NodeIdentity.load_or_create(tmp_path).node_id == winner.node_id
