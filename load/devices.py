"""A fleet of device certificates for the k6 rollout (load/rollout.sh): a fleet CA, its CRL, and
N devices, each with its own key and a certificate for the clientAuth EKU.

    python3 load/devices.py DIR N   writes DIR/fleet-ca.pem, DIR/fleet-crl.pem and
                                    DIR/devices/device-NNNNN.{pem,key} for NNNNN = 0 .. N-1
"""
import os
import sys

from cryptography.x509.oid import ExtendedKeyUsageOID

from reload import ca, crl, key_pem, leaf, pem, write


def main(d, n):
    fleet = ca("Rollout Fleet CA")
    write(f"{d}/fleet-ca.pem", pem(fleet[0]))
    write(f"{d}/fleet-crl.pem", crl(fleet, [], 1))
    os.makedirs(f"{d}/devices", exist_ok=True)
    for i in range(n):
        cert, key = leaf(fleet, f"device-{i:05d}", ExtendedKeyUsageOID.CLIENT_AUTH)
        write(f"{d}/devices/device-{i:05d}.pem", pem(cert))
        write(f"{d}/devices/device-{i:05d}.key", key_pem(key))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
