// k6: one new mTLS connection per request (noConnectionReuse), device certificate via tlsAuth.
// Driven by load/handshakes.sh; env: PORT, CERT, KEY, N (iterations), VUS.
import http from 'k6/http';
import { check } from 'k6';

export const options = {
  vus: parseInt(__ENV.VUS || '8'),
  iterations: parseInt(__ENV.N || '3000'),
  noConnectionReuse: true,
  insecureSkipTLSVerify: true, // the benchmark measures the server; the tests verify the edge's certificate
  tlsAuth: [{ domains: ['localhost'], cert: open(__ENV.CERT), key: open(__ENV.KEY) }],
  thresholds: { checks: ['rate==1.0'] },
};

export default function () {
  const r = http.get(`https://localhost:${__ENV.PORT}/firmware/manifest.json`);
  check(r, { 'status 200': (x) => x.status === 200 });
}
