// k6: one new mTLS connection per request (noConnectionReuse), device certificate via tlsAuth.
// Driven by load/handshakes.sh; env: PORT, N (iterations), VUS, and either CERT and KEY (one
// device for every connection) or CERTS_DIR and OFFSET (a fleet: iteration i connects as device
// OFFSET + i, each with its own certificate, files from load/devices.py). k6 chooses a client
// certificate by host name only, so device K is reached as dev-K.fleet.invalid (SNI), mapped to
// 127.0.0.1 by the hosts option; the Host header stays localhost.
import http from 'k6/http';
import { check } from 'k6';
import exec from 'k6/execution';

const n = parseInt(__ENV.N || '3000');
const fleet = __ENV.CERTS_DIR;
const offset = parseInt(__ENV.OFFSET || '0');
const device = (k) => `dev-${k}.fleet.invalid`;
const tlsAuth = [];
const hosts = {};
if (fleet) {
  for (let k = offset; k < offset + n; k++) {
    const id = String(k).padStart(5, '0');
    hosts[device(k)] = '127.0.0.1';
    tlsAuth.push({ domains: [device(k)], cert: open(`${fleet}/device-${id}.pem`), key: open(`${fleet}/device-${id}.key`) });
  }
} else {
  tlsAuth.push({ domains: ['localhost'], cert: open(__ENV.CERT), key: open(__ENV.KEY) });
}

export const options = {
  vus: parseInt(__ENV.VUS || '8'),
  iterations: n,
  noConnectionReuse: true,
  insecureSkipTLSVerify: true, // the benchmark measures the server; the tests verify the edge's certificate
  tlsAuth,
  hosts,
  thresholds: { checks: ['rate==1.0'] },
};

export default function () {
  const name = fleet ? device(offset + exec.scenario.iterationInTest) : 'localhost';
  const r = http.get(`https://${name}:${__ENV.PORT}/firmware/manifest.json`, { headers: { Host: 'localhost' } });
  check(r, { 'status 200': (x) => x.status === 200 });
}
