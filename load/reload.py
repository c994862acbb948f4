"""Helpers for load/reload.sh (needs python3 with `cryptography`).

  reload.py pki DIR
      A device CA, devices `good` and `probe`, CRLs (clean variants, and one revoking `probe`)
      and two server certificates, written into DIR.
  reload.py latency PORT DIR CRL TRIES [RELOAD-COMMAND...]
      TRIES times: restore `probe` (a clean CRL), open a keep-alive connection for it, then write
      the revoking CRL over CRL (and run RELOAD-COMMAND, if given) and poll every 10 ms until
      `probe` is refused: on its open connection, and then on a new one (a server may close the
      old connection and only refuse the new handshake). Prints each delay and p50/max, in ms.
"""
import datetime
import http.client
import os
import socket
import ssl
import statistics
import subprocess
import sys
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def now():
    return datetime.datetime.now(datetime.timezone.utc)


def write(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key):
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def ca(cn, issuer=None):
    """A root CA, or with `issuer` (cert, key) an issuing CA under it."""
    key = ec.generate_private_key(ec.SECP256R1())
    icert, ikey = issuer or (None, key)
    b = (
        x509.CertificateBuilder()
        .subject_name(name(cn))
        .issuer_name(icert.subject if icert else name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now() - datetime.timedelta(days=1))
        .not_valid_after(now() + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0 if icert else None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if icert:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ikey.public_key()), critical=False)
    return b.sign(ikey, hashes.SHA256()), key


def leaf(issuer, cn, eku, dns=()):
    icert, ikey = issuer
    key = ec.generate_private_key(ec.SECP256R1())
    b = (
        x509.CertificateBuilder()
        .subject_name(name(cn))
        .issuer_name(icert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now() - datetime.timedelta(days=1))
        .not_valid_after(now() + datetime.timedelta(days=365))
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ikey.public_key()), critical=False)
    )
    if dns:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False)
    return b.sign(ikey, hashes.SHA256()), key


def crl(issuer, revoked, number):
    icert, ikey = issuer
    b = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(icert.subject)
        .last_update(now() - datetime.timedelta(minutes=number))
        .next_update(now() + datetime.timedelta(days=30))
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for serial in revoked:
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now()).build()
        )
    return b.sign(ikey, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def make_pki(d):
    devices = ca("Reload Bench Device CA")
    write(f"{d}/bench-ca.pem", pem(devices[0]))
    serials = {}
    for stem in ["good", "probe"]:
        cert, key = leaf(devices, f"device-{stem}", ExtendedKeyUsageOID.CLIENT_AUTH)
        write(f"{d}/{stem}.pem", pem(cert))
        write(f"{d}/{stem}.key", key_pem(key))
        write(f"{d}/{stem}-both.pem", pem(cert) + key_pem(key))
        serials[stem] = cert.serial_number
    for i in range(1, 4):
        write(f"{d}/crl-clean-{i}.pem", crl(devices, [], i))
    write(f"{d}/crl-probe.pem", crl(devices, [serials["probe"]], 10))
    write(f"{d}/bench-crl.pem", crl(devices, [], 1))
    servers = ca("Reload Bench Server CA")
    for v in ["a", "b"]:
        cert, key = leaf(servers, "localhost", ExtendedKeyUsageOID.SERVER_AUTH, ["localhost"])
        write(f"{d}/server-{v}.pem", pem(cert))
        write(f"{d}/server-{v}.key", key_pem(key))


def context(d):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(f"{d}/probe.pem", f"{d}/probe.key")
    return ctx


def ok(conn):
    """Whether a request on `conn` is answered 200."""
    try:
        conn.request("GET", "/files/probe.bin?size=16")
        r = conn.getresponse()
        r.read()
        return r.status == 200
    except (OSError, http.client.HTTPException, ssl.SSLError):
        return False


def connect(port, ctx):
    return http.client.HTTPSConnection("localhost", port, context=ctx, timeout=5)


def latency(port, d, crl_file, tries, reload_cmd):
    ctx = context(d)
    delays = []
    for t in range(tries):
        write(crl_file, open(f"{d}/crl-clean-{t % 3 + 1}.pem", "rb").read())
        if reload_cmd:
            subprocess.run(reload_cmd, check=True)
        deadline = time.time() + 10
        conn = connect(port, ctx)
        while not ok(conn):
            if time.time() > deadline:
                sys.exit(f"try {t}: the probe device is not let in again")
            time.sleep(0.05)
            conn = connect(port, ctx)
        # Let the server settle on the clean CRL (nginx's old workers close their connections),
        # then open the connection the revocation will find.
        time.sleep(1)
        conn = connect(port, ctx)
        if not ok(conn):
            sys.exit(f"try {t}: the probe device is refused on a new connection after the clean CRL")
        started = time.time()
        write(crl_file, open(f"{d}/crl-probe.pem", "rb").read())
        if reload_cmd:
            subprocess.run(reload_cmd, check=True)
        while True:
            if not ok(conn):
                conn = connect(port, ctx)
                if not ok(conn):
                    break
            if time.time() - started > 10:
                sys.exit(f"try {t}: the probe device is still served 10 s after its revocation")
            time.sleep(0.01)
        delays.append((time.time() - started) * 1000)
    print("delays ms: " + " ".join(f"{x:.0f}" for x in delays))
    print(f"p50 {statistics.median(delays):.0f} ms, max {max(delays):.0f} ms over {len(delays)} tries")


if __name__ == "__main__":
    if sys.argv[1] == "pki":
        make_pki(sys.argv[2])
    elif sys.argv[1] == "latency":
        latency(int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6:])
