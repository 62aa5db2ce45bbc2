"""Test certificates: a throw-away CA and the certificates it signs, written as PEM files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["issue_cert"]


def issue_cert(d: Path, stem: str, ca: Any | None, san_ip: str | None = None) -> tuple[Path, Path, Any]:
    """A certificate (self-signed CA when ``ca`` is None) and key, written as PEM; returns (cert, key, (cert, key))."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, stem)])
    issuer_cert, issuer_key = ca if ca else (None, key)
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca is None, path_length=None), critical=True)
    )
    if san_ip:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(san_ip))]), False
        )
    cert = b.sign(issuer_key, hashes.SHA256())
    cp, kp = d / f"{stem}.pem", d / f"{stem}.key"
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cp, kp, (cert, key)
