"""TLS material: a self-signed certificate per node, its fingerprint, and probing a server's.

gRPC's TLS verifies a server against root certificates; peers have no common CA, so a dialer
learns the server's certificate first (from the peer's signed record, or by probing the port) and
pins exactly that certificate for the channel. The handshake then binds the certificate's
fingerprint to the peer's identity key, so a pinned certificate that does not belong to the peer
is caught there.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gossamer.core.errors import DeadlineExceededError, PeerUnavailableError, ProtocolError
from gossamer.net.addresses import split_host_port

__all__ = ["TLS_SERVER_NAME", "TlsCertificate", "cert_pem_of_der", "probe_server_certificate"]

TLS_SERVER_NAME = "gossamer.peer"
"""The name every node's certificate carries; dialers override the target name with it."""

_MAX_CERT_DER_BYTES = 8192


@dataclass(frozen=True, slots=True)
class TlsCertificate:
    """A node's TLS key and self-signed certificate (ECDSA P-256, made fresh at start)."""

    key_pem: bytes
    """The private key, PEM."""
    cert_pem: bytes
    """The certificate, PEM."""
    cert_der: bytes
    """The certificate, DER (what the fingerprint is taken over)."""

    @property
    def sha256(self) -> bytes:
        """The certificate's fingerprint."""
        return hashlib.sha256(self.cert_der).digest()

    @classmethod
    def generate(cls, valid_days: int = 365) -> TlsCertificate:
        """A fresh key and a self-signed certificate for :data:`TLS_SERVER_NAME`."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TLS_SERVER_NAME)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=valid_days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(TLS_SERVER_NAME)]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(
            key_pem=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            cert_der=cert.public_bytes(serialization.Encoding.DER),
        )


def cert_pem_of_der(cert_der: bytes) -> bytes:
    """PEM of a DER certificate received from the network.

    Raises:
        ProtocolError: the bytes are oversized or not a certificate.
    """
    if not cert_der or len(cert_der) > _MAX_CERT_DER_BYTES:
        raise ProtocolError(f"a TLS certificate of {len(cert_der)} bytes is out of bounds")
    try:
        cert = x509.load_der_x509_certificate(cert_der)
    except ValueError as exc:
        raise ProtocolError(f"not a DER certificate: {exc}") from exc
    return cert.public_bytes(serialization.Encoding.PEM)


async def probe_server_certificate(address: str, timeout_s: float) -> bytes:
    """Open a TLS connection to ``address`` and return the server's certificate (DER).

    The certificate is not trusted here; the handshake that follows proves who holds it.

    Raises:
        PeerUnavailableError: nothing answers there, or it does not speak TLS.
        DeadlineExceededError: the probe took longer than ``timeout_s``.
    """
    try:
        host, port = split_host_port(address)
    except ProtocolError as exc:
        raise PeerUnavailableError(f"cannot dial {address!r}: {exc}") from exc
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # pinned and verified by the handshake, not by a CA
    context.set_alpn_protocols(["h2"])
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(
                host, port, ssl=context, server_hostname=TLS_SERVER_NAME
            )
            ssl_object = writer.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
    except TimeoutError as exc:
        raise DeadlineExceededError(f"TLS probe of {address} took over {timeout_s} s") from exc
    except (OSError, ssl.SSLError, ValueError, UnicodeError, OverflowError) as exc:
        raise PeerUnavailableError(f"cannot reach {address}: {exc}") from exc
    finally:
        if writer is not None:
            writer.close()
            try:
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()
            except (OSError, ssl.SSLError, TimeoutError):
                pass
    if not der:
        raise PeerUnavailableError(f"{address} presented no TLS certificate")
    return bytes(der)
