"""A fleet of device certificates for the k6 rollout (load/rollout.sh) and handshakes
(load/handshakes.sh): a fleet CA, its CRL, and N devices, each with its own key and a
certificate for the clientAuth EKU.

    python3 load/devices.py DIR N [chain]
        writes DIR/fleet-ca.pem, DIR/fleet-crl.pem and DIR/devices/device-NNNNN.{pem,key} for
        NNNNN = 0 .. N-1; with `chain`, the devices' CA is an issuing CA under a fleet root (both
        in fleet-ca.pem, both CRLs in fleet-crl.pem), the shape of the demo's device chain.
"""
import datetime
import os
import sys

from cryptography.x509.oid import ExtendedKeyUsageOID

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from reload import ca, crl, key_pem, leaf, name, now, pem, write


def issuing(root, cn):
    """A CA under `root`."""
    rcert, rkey = root
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name(cn))
        .issuer_name(rcert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now() - datetime.timedelta(days=1))
        .not_valid_after(now() + datetime.timedelta(days=1825))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(rkey.public_key()), critical=False)
        .sign(rkey, hashes.SHA256())
    )
    return cert, key


def main(d, n, chain=False):
    root = ca("Rollout Fleet CA")
    fleet = issuing(root, "Rollout Fleet Issuing CA") if chain else root
    cas, crls = [root], [crl(root, [], 1)]
    if chain:
        cas.append(fleet)
        crls.append(crl(fleet, [], 1))
    write(f"{d}/fleet-ca.pem", b"".join(pem(c[0]) for c in cas))
    write(f"{d}/fleet-crl.pem", b"".join(crls))
    os.makedirs(f"{d}/devices", exist_ok=True)
    for i in range(n):
        cert, key = leaf(fleet, f"device-{i:05d}", ExtendedKeyUsageOID.CLIENT_AUTH)
        write(f"{d}/devices/device-{i:05d}.pem", pem(cert))
        write(f"{d}/devices/device-{i:05d}.key", key_pem(key))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:] == ["chain"])
