'use strict';
// Shared helpers for the WebSocket load clients: argument parsing, devices, payloads and a
// log-bucketed latency histogram that merges across processes.

const fs = require('node:fs');

function parseArgs(argv, defaults) {
  const out = { ...defaults };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith('--')) throw new Error(`unexpected argument ${a}`);
    const eq = a.indexOf('=');
    let key;
    let value;
    if (eq >= 0) {
      key = a.slice(2, eq);
      value = a.slice(eq + 1);
    } else {
      key = a.slice(2);
      value = argv[++i];
    }
    if (!(key in defaults)) throw new Error(`unknown option --${key}`);
    out[key] = typeof defaults[key] === 'number' ? Number(value) : value;
    if (typeof defaults[key] === 'number' && !Number.isFinite(out[key])) {
      throw new Error(`--${key} expects a number`);
    }
  }
  return out;
}

// "device_id token" per line; without a file, made-up devices with a dummy token.
function loadDevices(path) {
  if (!path) {
    return Array.from({ length: 16 }, (_, i) => ({
      id: `bench-${String(i).padStart(3, '0')}`,
      token: 'pct_dummy',
    }));
  }
  const devices = [];
  for (const line of fs.readFileSync(path, 'utf8').split('\n')) {
    const m = line.trim().match(/^(\S+)\s+(\S+)$/);
    if (m) devices.push({ id: m[1], token: m[2] });
  }
  if (devices.length === 0) throw new Error(`no devices in ${path}`);
  return devices;
}

// Synthetic PPG windows rendered once, as a device's JSON encoder prints doubles.
function sampleVariants(count, variants, rateHz) {
  const out = [];
  for (let k = 0; k < variants; k++) {
    const phase = Math.random() * 10;
    const values = [];
    for (let i = 0; i < count; i++) {
      const t = i / rateHz + phase;
      const v =
        0.5 +
        0.3 * Math.sin(2 * Math.PI * 1.2 * t) +
        0.08 * Math.sin(2 * Math.PI * 2.4 * t + 0.7) +
        0.05 * Math.sin(2 * Math.PI * 0.25 * t) +
        (Math.random() - 0.5) * 0.02;
      values.push(v);
    }
    const hr = (60 + Math.random() * 40).toFixed(1);
    const spo2 = (95 + Math.random() * 4).toFixed(1);
    out.push(`,"rate_hz":${rateHz},"ppg":${JSON.stringify(values)},"hr":${hr},"spo2":${spo2}}`);
  }
  return out;
}

// Latency histogram: buckets 1% wide in microseconds (log scale), up to ~100 s.
const GROWTH = Math.log(1.01);
const BUCKETS = Math.ceil(Math.log(1e8) / GROWTH) + 1;

class Histogram {
  constructor(counts) {
    this.counts = counts ? Float64Array.from(counts) : new Float64Array(BUCKETS);
  }

  record(us) {
    const i = us <= 1 ? 0 : Math.min(BUCKETS - 1, Math.ceil(Math.log(us) / GROWTH));
    this.counts[i] += 1;
  }

  merge(other) {
    for (let i = 0; i < BUCKETS; i++) this.counts[i] += other.counts[i];
  }

  total() {
    let n = 0;
    for (let i = 0; i < BUCKETS; i++) n += this.counts[i];
    return n;
  }

  // Upper bound of the bucket holding the p-th percentile, in microseconds.
  percentile(p) {
    const n = this.total();
    if (n === 0) return null;
    const rank = Math.ceil((p / 100) * n);
    let seen = 0;
    for (let i = 0; i < BUCKETS; i++) {
      seen += this.counts[i];
      if (seen >= rank) return Math.exp(i * GROWTH);
    }
    return Math.exp((BUCKETS - 1) * GROWTH);
  }

  toJSON() {
    return Array.from(this.counts);
  }
}

function authHeaders(token) {
  return { Authorization: `Bearer ${token}` };
}

module.exports = { parseArgs, loadDevices, sampleVariants, Histogram, authHeaders };
