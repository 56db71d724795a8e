'use strict';
// Opens N authenticated WebSocket connections that send nothing, and holds them.
//
//   node bench/ws/idle.js --url ws://127.0.0.1:3001/ingestion/ws --connections 10000 \
//        [--devices devices.txt] [--concurrency 256]
//
// Needs an open-files limit above N (the harness raises it). Once every connection has
// been tried, prints "PULSECAL_IDLE_READY {...}" (opened, failed, failure kinds, seconds).
// Then reads commands on stdin, one per line: "status" prints "PULSECAL_IDLE_STATUS {...}"
// (how many are still open, how many the server closed); "exit" (or end of input) closes
// them all and exits.

const readline = require('node:readline');
const WebSocket = require('ws');
const { parseArgs, loadDevices, authHeaders } = require('./common');

const DEFAULTS = {
  url: 'ws://127.0.0.1:3001/ingestion/ws',
  connections: 10000,
  devices: '',
  concurrency: 256,
  'connect-timeout': 30,
};

async function main() {
  const opts = parseArgs(process.argv.slice(2), DEFAULTS);
  const devices = loadDevices(opts.devices);
  const sockets = [];
  const failures = {};
  let opened = 0;
  let failed = 0;
  let closedByServer = 0;
  let messages = 0;
  let next = 0;
  let closing = false;
  const started = Date.now();

  function fail(kind) {
    failed += 1;
    failures[kind] = (failures[kind] || 0) + 1;
  }

  function openOne() {
    return new Promise((resolve) => {
      const device = devices[next % devices.length];
      next += 1;
      const ws = new WebSocket(opts.url, {
        headers: authHeaders(device.token),
        perMessageDeflate: false,
        handshakeTimeout: opts['connect-timeout'] * 1000,
      });
      let isOpen = false;
      ws.once('open', () => {
        isOpen = true;
        opened += 1;
        sockets.push(ws);
        resolve();
      });
      ws.once('unexpected-response', (_req, res) => {
        fail(`HTTP ${res.statusCode}`);
        res.resume();
        ws.terminate();
        resolve();
      });
      ws.on('error', (err) => {
        if (!isOpen) {
          fail(err.code || err.message);
          resolve();
        }
      });
      ws.on('message', () => {
        messages += 1;
      });
      ws.once('close', () => {
        if (isOpen && !closing) closedByServer += 1;
      });
    });
  }

  const lanes = Array.from({ length: Math.min(opts.concurrency, opts.connections) }, async () => {
    while (next < opts.connections) await openOne();
  });
  await Promise.all(lanes);
  const status = () => ({
    requested: opts.connections,
    opened,
    failed,
    failure_kinds: failures,
    open_now: opened - closedByServer,
    closed_by_server: closedByServer,
    messages_received: messages,
    seconds: (Date.now() - started) / 1000,
  });
  process.stdout.write(`PULSECAL_IDLE_READY ${JSON.stringify(status())}\n`);

  const finish = () => {
    closing = true;
    for (const ws of sockets) ws.terminate();
    process.exit(0);
  };
  const rl = readline.createInterface({ input: process.stdin });
  rl.on('line', (line) => {
    const cmd = line.trim();
    if (cmd === 'status') process.stdout.write(`PULSECAL_IDLE_STATUS ${JSON.stringify(status())}\n`);
    else if (cmd === 'exit') finish();
  });
  rl.on('close', finish);
  process.on('SIGTERM', finish);
  process.on('SIGINT', finish);
}

main().catch((err) => {
  process.stderr.write(`idle.js: ${err.stack || err}\n`);
  process.exit(2);
});
