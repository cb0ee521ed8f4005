"""TLS certificates and SuperNode keys for a deployment, and the checks run before start-up.

- A CA (EC P-384, self-signed) and a server certificate it signs, whose subject
  alternative names list every name and address clients use to reach the server.
- One key pair per client (EC P-384, OpenSSH format): Flower's SuperNode authentication
  signs every request with the private key; the SuperLink accepts only registered public keys.

Everything uses the ``cryptography`` package. Problems a user can fix raise FedtuneError.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune.errors import FedtuneError
from fedtune.runfolder import atomic_write_bytes

CURVE = ec.SECP384R1()  # P-384: what Flower recommends for SuperNode keys
CA_FILES = ("ca.crt", "ca.key")
SERVER_FILES = ("server.pem", "server.key")
VALID_DAYS = 825


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtune"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey, fmt: serialization.PrivateFormat) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    atomic_write_bytes(path, data, mode=0o600)  # owner only from the first byte (never write-then-chmod)


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def make_certs(folder: str | Path, hosts: list[str], overwrite: bool = False) -> dict[str, Path]:
    """A CA and a server certificate for ``hosts`` (DNS names or IP addresses) in ``folder``."""
    folder = Path(folder)
    hosts = [h.strip() for h in hosts if h.strip()]
    if not hosts:
        raise FedtuneError("name at least one host the clients use to reach the server (--host server.example.org)")
    paths = {n: folder / n for n in CA_FILES + SERVER_FILES}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise FedtuneError(f"{existing[0]} already exists; pass --overwrite to replace the certificates")
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(CURVE)
    ca = (x509.CertificateBuilder().subject_name(_name("fedtune CA")).issuer_name(_name("fedtune CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA384()))
    key = ec.generate_private_key(CURVE)
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    folder.mkdir(parents=True, exist_ok=True)
    _write_private(paths["ca.key"], ca_key, serialization.PrivateFormat.PKCS8)
    atomic_write_bytes(paths["ca.crt"], ca.public_bytes(serialization.Encoding.PEM))
    _write_private(paths["server.key"], key, serialization.PrivateFormat.PKCS8)
    atomic_write_bytes(paths["server.pem"], cert.public_bytes(serialization.Encoding.PEM))
    return paths


def make_client_key(folder: str | Path, name: str, overwrite: bool = False) -> tuple[Path, Path]:
    """``folder/name`` (OpenSSH private key, owner-only) and ``folder/name.pub``."""
    if not name or "/" in name or name.startswith("."):
        raise FedtuneError(f"client name {name!r} must be a plain file name such as clinic-a")
    folder = Path(folder)
    private, public = folder / name, folder / f"{name}.pub"
    if (private.exists() or public.exists()) and not overwrite:
        raise FedtuneError(f"{private} already exists; pass --overwrite to replace the key")
    key = ec.generate_private_key(CURVE)
    folder.mkdir(parents=True, exist_ok=True)
    _write_private(private, key, serialization.PrivateFormat.OpenSSH)
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    atomic_write_bytes(public, pub + f" {name}\n".encode())
    return private, public


# ---- checks before a process starts ----------------------------------------------------
def _read(path: str | Path, what: str, flag: str) -> bytes:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FedtuneError(f"{what} {p} not found; pass the right path with {flag} (make one with `fedtune certs`)")
    try:
        return p.read_bytes()
    except OSError as exc:
        raise FedtuneError(f"cannot read {what} {p} ({exc.strerror}); check its permissions") from None


def load_certificate(path: str | Path, what: str, flag: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path, what, flag))
    except ValueError:
        raise FedtuneError(f"{what} {path} is not a PEM certificate; pass the certificate file with {flag}") from None


def cert_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in san.get_values_for_type(x509.DNSName) + san.get_values_for_type(x509.IPAddress)]


def check_server_tls(ca: str | Path, cert: str | Path, key: str | Path, hosts: list[str]) -> None:
    """The CA signed the certificate, the key is the certificate's, and every host clients
    use is among the certificate's names (TLS checks subject alternative names only)."""
    ca_cert = load_certificate(ca, "CA certificate", "--ca")
    server = load_certificate(cert, "server certificate", "--cert")
    try:
        server_key = serialization.load_pem_private_key(_read(key, "server key", "--key"), password=None)
    except (ValueError, TypeError):
        raise FedtuneError(f"server key {key} is not an unencrypted PEM private key; pass the key file with --key") from None
    try:
        server.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise FedtuneError(f"server certificate {cert} was not signed by the CA {ca}; make both with `fedtune certs`") from None
    if server_key.public_key().public_numbers() != server.public_key().public_numbers():
        raise FedtuneError(f"server key {key} does not belong to the certificate {cert}; pass the matching key")
    now = datetime.datetime.now(datetime.timezone.utc)
    if not server.not_valid_before_utc <= now <= server.not_valid_after_utc:
        raise FedtuneError(f"server certificate {cert} is not valid now (valid {server.not_valid_before_utc:%Y-%m-%d} "
                           f"to {server.not_valid_after_utc:%Y-%m-%d}); make a new one with `fedtune certs`")
    names = cert_names(server)
    for host in hosts:
        if not _matches(host, names):
            raise FedtuneError(f"server certificate {cert} does not name {host!r} (it names {', '.join(names) or 'nothing'}); "
                               f"make one with `fedtune certs --host {host}`")


def _matches(host: str, names: list[str]) -> bool:
    try:
        return ipaddress.ip_address(host) in {ipaddress.ip_address(n) for n in names if _is_ip(n)}
    except ValueError:
        return any(n.lower() == host.lower() or (n.startswith("*.") and host.lower().endswith(n[1:].lower())
                                                 and host.count(".") == n.count(".")) for n in names)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def check_ca(path: str | Path) -> None:
    load_certificate(path, "CA certificate", "--ca")


def check_client_key(path: str | Path) -> None:
    """An unencrypted OpenSSH (or PEM) EC private key on a NIST curve, as Flower needs."""
    data = _read(path, "client private key", "key (client config)")
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise FedtuneError(f"client private key {path} is not an unencrypted OpenSSH or PEM private key; "
                               "make one with `fedtune keys NAME`") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise FedtuneError(f"client private key {path} is not an EC key on a NIST curve (P-384 recommended); "
                           "make one with `fedtune keys NAME`")


def check_public_key(path: str | Path) -> None:
    data = _read(path, "client public key", "the key file")
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise FedtuneError(f"{path} is not an OpenSSH public key; use the .pub file `fedtune keys` wrote") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise FedtuneError(f"{path} is not an EC public key (P-384); make the key pair with `fedtune keys NAME`")
