// k6: a firmware rollout. Devices (device certificate via tlsAuth) poll the manifest, and a
// share of them download the image, all through the edge's cache.
//   load/rollout.sh            (starts origin and edge, runs this, checks thresholds)
import http from 'k6/http';
import { check, sleep } from 'k6';

const base = `https://localhost:${__ENV.PORT || '8443'}`;
const imageSize = parseInt(__ENV.IMAGE_SIZE || '16777216');

export const options = {
  scenarios: {
    rollout: {
      executor: 'ramping-vus',
      startVUs: 0,
      stages: [
        { duration: '5s', target: parseInt(__ENV.DEVICES || '50') },
        { duration: __ENV.HOLD || '20s', target: parseInt(__ENV.DEVICES || '50') },
        { duration: '3s', target: 0 },
      ],
    },
  },
  insecureSkipTLSVerify: true, // the benchmark measures the edge; the tests verify its certificate
  tlsAuth: [{ domains: ['localhost'], cert: open(__ENV.CERT), key: open(__ENV.KEY) }],
  thresholds: {
    http_req_failed: ['rate<0.01'],
    'http_req_duration{kind:manifest}': ['p(95)<200'],
    'http_req_duration{kind:image}': ['p(95)<5000'],
    checks: ['rate>0.99'],
  },
};

export default function () {
  const m = http.get(`${base}/files/manifest.json?size=512&max_age=5`, { tags: { kind: 'manifest' } });
  check(m, { 'manifest 200': (r) => r.status === 200 });
  if (Math.random() < 0.2) {
    const img = http.get(`${base}/files/fw-1.4.2.bin?size=${imageSize}`, {
      tags: { kind: 'image' },
      responseType: 'none',
    });
    check(img, { 'image 200': (r) => r.status === 200 });
  }
  sleep(0.5);
}
