// k6: a firmware rollout against one edge or a fleet of them. Devices poll the manifest, and one
// iteration in five downloads the image, all through the edges' caches. Each iteration is a
// device: the virtual users sweep through the fleet's certificates, so every device connects
// with its own certificate (a new TLS connection and handshake), not one certificate shared by
// every virtual user.
//   load/rollout.sh            (starts the origin and the edges, runs this, checks thresholds)
// Environment:
//   BASE_URLS   comma-separated edges, e.g. https://10.0.0.11:8443,https://10.0.0.12:8443
//               (or BASE_URL for one; default https://127.0.0.1:8443)
//   CERTS_DIR   device-NNNNN.pem/.key files (load/devices.py); CERTS how many (default 200)
//   HOST        the Host header (default localhost); DEVICES virtual users (50); HOLD (20s)
//   IMAGE_SIZE  bytes of the image (16 MiB)
// k6 chooses a client certificate by host name only, so device N is reached as the host
// dev-N.fleet.invalid (SNI), which the hosts option maps to its edge, device N mod the number of
// edges; the Host header stays HOST, so that every device shares one cache entry per object.
import http from 'k6/http';
import { check, sleep } from 'k6';

const edges = (__ENV.BASE_URLS || __ENV.BASE_URL || 'https://127.0.0.1:8443').split(',').map((u) => u.trim());
const certs = parseInt(__ENV.CERTS || '200');
const devices = parseInt(__ENV.DEVICES || '50');
const host = __ENV.HOST || 'localhost';
const imageSize = parseInt(__ENV.IMAGE_SIZE || '16777216');
const dir = __ENV.CERTS_DIR;

const deviceName = (n) => `dev-${n}.fleet.invalid`;
const edgeOf = (n) => n % edges.length;
const hosts = {};
const tlsAuth = [];
for (let n = 0; n < certs; n++) {
  const id = String(n).padStart(5, '0');
  hosts[deviceName(n)] = edges[edgeOf(n)].replace(/^https:\/\//, '');
  tlsAuth.push({
    domains: [deviceName(n)],
    cert: open(`${dir}/device-${id}.pem`),
    key: open(`${dir}/device-${id}.key`),
  });
}

// Thresholds for the whole run, and errors for each edge on its own.
const thresholds = {
  http_req_failed: ['rate<0.01'],
  'http_req_duration{kind:manifest}': ['p(95)<200'],
  'http_req_duration{kind:image}': ['p(95)<5000'],
  checks: ['rate>0.99'],
};
edges.forEach((_, i) => {
  thresholds[`http_req_failed{edge:${i}}`] = ['rate<0.01'];
});

export const options = {
  scenarios: {
    rollout: {
      executor: 'ramping-vus',
      startVUs: 0,
      stages: [
        { duration: '5s', target: devices },
        { duration: __ENV.HOLD || '20s', target: devices },
        { duration: '3s', target: 0 },
      ],
    },
  },
  hosts,
  tlsAuth,
  insecureSkipTLSVerify: true, // the benchmark measures the edges; the tests verify their certificates
  thresholds,
};

export default function () {
  const n = (__VU - 1 + __ITER * devices) % certs; // this iteration's device
  const base = `https://${deviceName(n)}`;
  const params = (kind) => ({ headers: { Host: host }, tags: { kind, edge: String(edgeOf(n)) } });
  const m = http.get(`${base}/files/manifest.json?size=512&max_age=5`, params('manifest'));
  check(m, { 'manifest 200': (r) => r.status === 200 });
  if (Math.random() < 0.2) {
    const img = http.get(`${base}/files/fw-1.4.2.bin?size=${imageSize}`, { ...params('image'), responseType: 'none' });
    check(img, { 'image 200': (r) => r.status === 200 });
  }
  sleep(0.5);
}
