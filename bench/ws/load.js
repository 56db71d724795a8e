'use strict';
// WebSocket load: C connections, each with exactly one batch in flight (send, wait for the
// answer, send the next), every batch with a unique seq. Runs --warmup seconds unmeasured,
// then --duration seconds measured; optionally spread over --procs node processes.
//
//   node bench/ws/load.js --url ws://127.0.0.1:3001/ingestion/ws --connections 64 \
//        --duration 10 --warmup 2 [--procs 2] [--devices devices.txt] [--seq-base 0]
//
// stdout: "PULSECAL_MEASURE_START" and "PULSECAL_MEASURE_END" when the measured window opens
// and closes (so a caller can sample CPU over exactly that window), then one line
// "PULSECAL_WS_JSON {...}" with acked msg/s, latency percentiles (us) and error counts.
// The seq of connection i is seq-base + i * 1e9 + n, so a caller that moves seq-base by
// 1e12 per run never repeats a (device_id, seq).

const { fork } = require('node:child_process');
const { performance } = require('node:perf_hooks');
const WebSocket = require('ws');
// ws masks each outgoing frame (1 KB here) in JavaScript unless bufferutil's native mask is
// installed; with it the client spends ~10% less CPU per message (17 against 19 us here), and
// it shares core 1 with Redis.
const NATIVE_MASK = (() => {
  if (process.env.WS_NO_BUFFER_UTIL) return false;
  try {
    require('bufferutil');
    return true;
  } catch {
    return false;
  }
})();
const { parseArgs, loadDevices, sampleVariants, Histogram, authHeaders } = require('./common');

const DEFAULTS = {
  url: 'ws://127.0.0.1:3001/ingestion/ws',
  connections: 64,
  duration: 10,
  warmup: 2,
  procs: 1,
  devices: '',
  'seq-base': 0,
  samples: 50,
  'connect-timeout': 10,
  drain: 2,
};
const CONN_STRIDE = 1e9;
const VARIANTS = 16;
const RATE_HZ = 50;

function connectAll(opts, first, count, devices) {
  const conns = [];
  const failures = [];
  const pending = [];
  for (let i = 0; i < count; i++) {
    const index = first + i;
    const device = devices[index % devices.length];
    const c = {
      index,
      ws: null,
      head: `{"device_id":"${device.id}","seq":`,
      seq: opts['seq-base'] + index * CONN_STRIDE,
      sentAt: 0,
      inFlight: false,
      open: false,
    };
    pending.push(
      new Promise((resolve) => {
        const ws = new WebSocket(opts.url, {
          headers: authHeaders(device.token),
          perMessageDeflate: false,
          handshakeTimeout: opts['connect-timeout'] * 1000,
        });
        c.ws = ws;
        ws.once('open', () => {
          c.open = true;
          conns.push(c);
          resolve();
        });
        ws.once('unexpected-response', (_req, res) => {
          failures.push(`HTTP ${res.statusCode}`);
          res.resume();
          ws.terminate();
          resolve();
        });
        ws.once('error', (err) => {
          if (!c.open) {
            failures.push(err.code || err.message);
            resolve();
          }
        });
      }),
    );
  }
  return Promise.all(pending).then(() => ({ conns, failures }));
}

// Drives the open connections from localStart (performance.now() ms); resolves with results.
function drive(opts, conns, localStart) {
  const variants = sampleVariants(opts.samples, VARIANTS, RATE_HZ);
  const measureFrom = localStart + opts.warmup * 1000;
  const measureTo = measureFrom + opts.duration * 1000;
  const hist = new Histogram();
  const errors = { reply: 0, closed: 0, mismatched: 0, unanswered: 0, socket: 0 };
  const errorSamples = [];
  let sent = 0;
  let acked = 0;
  let stopping = false;

  function sendNext(c) {
    if (stopping || !c.open) return;
    c.seq += 1;
    const msg = `${c.head}${c.seq},"ts":${Date.now()}${variants[c.seq % VARIANTS]}`;
    c.sentAt = performance.now();
    c.inFlight = true;
    sent += 1;
    c.ws.send(msg);
  }

  for (const c of conns) {
    c.ws.on('message', (data, isBinary) => {
      const now = performance.now();
      c.inFlight = false;
      let reply;
      try {
        reply = JSON.parse(isBinary ? data.toString('utf8') : data);
      } catch {
        reply = { error: { message: 'unparseable reply' } };
      }
      if (reply.error !== undefined) {
        errors.reply += 1;
        if (errorSamples.length < 5) errorSamples.push(reply);
      } else if (reply.ack !== c.seq) {
        errors.mismatched += 1;
        if (errorSamples.length < 5) errorSamples.push({ expected: c.seq, got: reply });
      } else if (now >= measureFrom && now < measureTo) {
        acked += 1;
        hist.record((now - c.sentAt) * 1000);
      }
      sendNext(c);
    });
    c.ws.on('error', () => {
      errors.socket += 1;
    });
    c.ws.on('close', (code, reason) => {
      const wasOpen = c.open;
      c.open = false;
      if (wasOpen && !stopping) {
        errors.closed += 1;
        if (errorSamples.length < 5) errorSamples.push({ closed: code, reason: reason.toString() });
      }
    });
  }

  return new Promise((resolve) => {
    setTimeout(
      () => {
        for (const c of conns) sendNext(c);
      },
      Math.max(0, localStart - performance.now()),
    );
    setTimeout(
      () => {
        stopping = true;
        const deadline = performance.now() + opts.drain * 1000;
        const finish = () => {
          const left = conns.filter((c) => c.inFlight && c.open).length;
          if (left > 0 && performance.now() < deadline) {
            setTimeout(finish, 20);
            return;
          }
          errors.unanswered = left;
          for (const c of conns) c.ws.terminate();
          resolve({ sent, acked, hist: hist.toJSON(), errors, errorSamples });
        };
        finish();
      },
      Math.max(0, measureTo - performance.now()),
    );
  });
}

function summarize(opts, parts, connectFailures, connected) {
  const hist = new Histogram();
  const errors = { reply: 0, closed: 0, mismatched: 0, unanswered: 0, socket: 0 };
  const errorSamples = [];
  let sent = 0;
  let acked = 0;
  for (const p of parts) {
    hist.merge(new Histogram(p.hist));
    for (const k of Object.keys(errors)) errors[k] += p.errors[k];
    errorSamples.push(...p.errorSamples);
    sent += p.sent;
    acked += p.acked;
  }
  const pct = (p) => {
    const v = hist.percentile(p);
    return v === null ? null : Math.round(v);
  };
  const failureCounts = {};
  for (const f of connectFailures) failureCounts[f] = (failureCounts[f] || 0) + 1;
  return {
    url: opts.url,
    connections: opts.connections,
    connected,
    connect_failures: connectFailures.length,
    connect_failure_kinds: failureCounts,
    procs: opts.procs,
    native_mask: NATIVE_MASK,
    warmup_s: opts.warmup,
    duration_s: opts.duration,
    sent,
    acked,
    rate: acked / opts.duration,
    latency_us: { p50: pct(50), p90: pct(90), p99: pct(99), p999: pct(99.9), max: pct(100) },
    errors,
    error_samples: errorSamples.slice(0, 5),
  };
}

function split(total, parts) {
  const out = [];
  let first = 0;
  for (let k = 0; k < parts; k++) {
    const count = Math.floor(total / parts) + (k < total % parts ? 1 : 0);
    out.push({ first, count });
    first += count;
  }
  return out;
}

function announce(localStart, opts) {
  const measureFrom = localStart + opts.warmup * 1000;
  setTimeout(
    () => process.stdout.write('PULSECAL_MEASURE_START\n'),
    Math.max(0, measureFrom - performance.now()),
  );
  setTimeout(
    () => process.stdout.write('PULSECAL_MEASURE_END\n'),
    Math.max(0, measureFrom + opts.duration * 1000 - performance.now()),
  );
}

async function runSingle(opts) {
  const devices = loadDevices(opts.devices);
  const { conns, failures } = await connectAll(opts, 0, opts.connections, devices);
  const localStart = performance.now() + 50;
  announce(localStart, opts);
  const result = await drive(opts, conns, localStart);
  return summarize(opts, [result], failures, conns.length);
}

async function runWorker() {
  const opts = JSON.parse(process.env.PULSECAL_WS_WORKER);
  const devices = loadDevices(opts.devices);
  const { conns, failures } = await connectAll(opts, opts.first, opts.count, devices);
  process.send({ type: 'ready', failures, connected: conns.length });
  process.once('message', async (msg) => {
    const localStart = performance.now() + (msg.t0 - Date.now());
    const result = await drive(opts, conns, localStart);
    process.send({ type: 'result', result }, () => process.exit(0));
  });
}

async function runParent(opts) {
  const workers = split(opts.connections, opts.procs).map(({ first, count }) => {
    const env = { ...process.env, PULSECAL_WS_WORKER: JSON.stringify({ ...opts, first, count }) };
    return fork(__filename, [], { env, stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  });
  const once = (w, type) =>
    new Promise((resolve, reject) => {
      w.on('message', (m) => {
        if (m.type === type) resolve(m);
      });
      w.once('exit', (code) => reject(new Error(`worker exited with ${code} before ${type}`)));
    });
  const ready = await Promise.all(workers.map((w) => once(w, 'ready')));
  const results = workers.map((w) => once(w, 'result'));
  const t0 = Date.now() + 100;
  for (const w of workers) w.send({ type: 'start', t0 });
  announce(performance.now() + (t0 - Date.now()), opts);
  const parts = (await Promise.all(results)).map((m) => m.result);
  return summarize(
    opts,
    parts,
    ready.flatMap((r) => r.failures),
    ready.reduce((n, r) => n + r.connected, 0),
  );
}

async function main() {
  if (process.env.PULSECAL_WS_WORKER) {
    await runWorker();
    return;
  }
  const opts = parseArgs(process.argv.slice(2), DEFAULTS);
  if (!NATIVE_MASK) process.stderr.write('load.js: bufferutil is not installed: masking in JavaScript\n');
  const summary = opts.procs > 1 ? await runParent(opts) : await runSingle(opts);
  process.stdout.write(`PULSECAL_WS_JSON ${JSON.stringify(summary)}\n`);
  const bad = summary.connected === 0 || summary.acked === 0;
  process.exitCode = bad ? 1 : 0;
}

main().catch((err) => {
  process.stderr.write(`load.js: ${err.stack || err}\n`);
  process.exit(2);
});
