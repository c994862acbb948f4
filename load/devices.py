"""A fleet of device certificates for the k6 rollout (load/rollout.sh) and handshakes
(load/handshakes.sh): a fleet CA, its CRL, and N devices, each with its own key and a
certificate for the clientAuth EKU.

    python3 load/devices.py DIR N [chain]
        writes DIR/fleet-ca.pem, DIR/fleet-crl.pem and DIR/devices/device-NNNNN.{pem,key} for
        NNNNN = 0 .. N-1; with `chain`, the devices' CA is an issuing CA under a fleet root (both
        in fleet-ca.pem, both CRLs in fleet-crl.pem), the shape of the demo's device chain.
"""
import os
import sys

from cryptography.x509.oid import ExtendedKeyUsageOID

from reload import ca, crl, key_pem, leaf, pem, write


def main(d, n, chain=False):
    root = ca("Rollout Fleet CA")
    fleet = ca("Rollout Fleet Issuing CA", issuer=root) if chain else root
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
