/*
 * slowloris.test.mjs — slow and idle connections cannot lock anyone out.
 *
 * From other loopback addresses (127.0.1.1 ... 127.0.1.150, so that each
 * stays under the per-address limit), a child process holds 2,000 slowloris
 * sockets (a request head trickled one byte a second) and 5,000 idle ones,
 * and opens a new one whenever the server closes one. Meanwhile this process,
 * on 127.0.0.1, asks /health every 250 ms and a chat completion every
 * second, for 20 s: each must be answered within 1 s (the bound the issue
 * sets), and correctly. The server closes the slow sockets at the request
 * deadline (--request-timeout 4 here), idle timeout or not. Also: one
 * address gets at most --max-conns-per-ip connections.
 *
 * Why: with a thread per connection and an idle timeout, ~1,030 sockets that
 * send a byte a second kept /health unanswered indefinitely. The event-driven
 * server holds them for the price of a socket each, and drops them at the
 * deadline.
 *
 * The attacker needs ~7,100 file descriptors and the server as many: the
 * child raises its soft limit (bash ulimit); the test skips, saying why, when
 * the hard limit is too low.
 *
 * This file is also the attacker: run with KVPARK_SLOWLORIS_ATTACK=1 it opens
 * the sockets instead of running tests (see attack()).
 */
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import net from 'node:net';
import { fileURLToPath } from 'node:url';
import { after, before, describe, it } from 'node:test';
import { GOLDEN, ONCE, chatBody, sleep, startServer } from './helpers.mjs';

const N_SLOW = 2000;
const N_IDLE = 5000;
const N_ADDR = 150;          /* 127.0.1.1 .. 127.0.1.150: ~47 sockets each, under the default 64 */
const OBSERVE_MS = 20000;
const NEED_FDS = N_SLOW + N_IDLE + 512;

/* ---- the attacker (a child process) -------------------------------- */

async function attack() {
  const port = Number(process.env.KVPARK_SLOWLORIS_PORT);
  const stats = { slowOpen: 0, idleOpen: 0, slowCut: 0, idleCut: 0, errors: 0 };
  let stopping = false;
  const addr = (i) => `127.0.1.${1 + (i % N_ADDR)}`;
  const head = 'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ';
  const slow = new Set();

  function open(i, isSlow) {
    return new Promise((resolve) => {
      const sock = net.connect({ port, host: '127.0.0.1', localAddress: addr(i) });
      let connected = false;
      sock.on('connect', () => {
        connected = true;
        stats[isSlow ? 'slowOpen' : 'idleOpen']++;
        if (isSlow) { sock.pos = 0; slow.add(sock); }
        resolve();
      });
      sock.on('error', () => { stats.errors++; });
      sock.on('close', () => {
        if (isSlow) slow.delete(sock);
        if (!connected) { resolve(); return; }
        stats[isSlow ? 'slowOpen' : 'idleOpen']--;
        if (stopping) return;
        stats[isSlow ? 'slowCut' : 'idleCut']++;
        setTimeout(() => open(i, isSlow), 100); /* a sustained attack: come back */
      });
    });
  }
  /* one byte a second on every slow socket: never idle, never finished */
  setInterval(() => {
    for (const s of slow) {
      const ch = s.pos < head.length ? head[s.pos] : 'a';
      s.pos++;
      s.write(ch);
    }
  }, 1000);
  setInterval(() => process.stdout.write(JSON.stringify(stats) + '\n'), 500);
  for (let i = 0; i < N_SLOW + N_IDLE; i += 250) { /* in slices: no SYN flood against the backlog */
    const batch = [];
    for (let k = i; k < Math.min(i + 250, N_SLOW + N_IDLE); k++) batch.push(open(k, k < N_SLOW));
    await Promise.all(batch);
  }
  process.stdout.write(JSON.stringify({ ...stats, ready: true }) + '\n');
  process.on('SIGTERM', () => { stopping = true; process.exit(0); });
}

/* ---- the tests ------------------------------------------------------ */

function fdLimits() {
  try {
    const out = execFileSync('bash', ['-c', 'echo $(ulimit -Sn) $(ulimit -Hn)'], { encoding: 'utf8' }).trim().split(' ');
    const num = (v) => (v === 'unlimited' ? Infinity : Number(v));
    return { soft: num(out[0]), hard: num(out[1]) };
  } catch { return { soft: 0, hard: 0 }; }
}

/* A request that must be answered within `ms` (the bound). */
async function timed(url, init, ms) {
  const t0 = Date.now();
  try {
    const r = await fetch(url, { ...init, signal: AbortSignal.timeout(ms) });
    const text = await r.text();
    return { status: r.status, text, ms: Date.now() - t0 };
  } catch (e) {
    return { status: 0, text: String(e), ms: Date.now() - t0 };
  }
}

if (process.env.KVPARK_SLOWLORIS_ATTACK) {
  await attack();
} else {
  const { hard } = fdLimits();
  const why = hard < NEED_FDS
    ? `the hard open-file limit (${hard}) is below the ${NEED_FDS} descriptors the attacker and the server each need`
    : false;

  describe('slow and idle connections', { timeout: 90000, skip: why }, () => {
    let server;
    before(async () => {
      server = await startServer({ args: ['--request-timeout', '4', '--parallel', '2', '--quiet'] });
    });
    after(async () => { if (server) await server.stop(); });

    it('one client address gets at most --max-conns-per-ip (64) connections', async () => {
      const socks = [];
      let closed = 0;
      for (let i = 0; i < 80; i++) {
        const s = net.connect({ port: server.port, host: '127.0.0.1', localAddress: '127.0.2.1' });
        s.on('error', () => {});
        s.on('close', () => { closed++; });
        socks.push(s);
      }
      await sleep(1500);
      for (const s of socks) s.destroy();
      assert.ok(closed >= 16, `only ${closed} of 80 connections from one address were refused`);
    });

    it(`${N_SLOW} slowloris + ${N_IDLE} idle sockets: /health and a chat completion answered within 1 s throughout`, async () => {
      const child = spawn('bash', ['-c', `ulimit -n ${NEED_FDS} && exec "$0" "$1"`, process.execPath, fileURLToPath(import.meta.url)], {
        env: { ...process.env, KVPARK_SLOWLORIS_ATTACK: '1', KVPARK_SLOWLORIS_PORT: String(server.port) },
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      let last = null;
      let ready = false;
      let buf = '';
      let err = '';
      child.stdout.on('data', (d) => {
        buf += d;
        for (let nl; (nl = buf.indexOf('\n')) >= 0; buf = buf.slice(nl + 1)) {
          last = JSON.parse(buf.slice(0, nl));
          if (last.ready) ready = true;
        }
      });
      child.stderr.on('data', (d) => { err += d; });
      const exited = new Promise((res) => child.once('exit', res));
      try {
        for (let i = 0; i < 600 && !ready && child.exitCode === null; i++) await sleep(100);
        assert.ok(ready, `the attacker did not get its sockets open: ${JSON.stringify(last)} ${err}`);
        /* the deadline cuts and the attacker reconnects in waves: wait for a crest */
        const open = () => last.slowOpen + last.idleOpen;
        for (let i = 0; i < 150 && open() < (N_SLOW + N_IDLE) * 0.9; i++) await sleep(100);
        assert.ok(open() >= (N_SLOW + N_IDLE) * 0.9,
          `only ${last.slowOpen} slow and ${last.idleOpen} idle sockets open: ${JSON.stringify(last)}`);

        const bad = [];
        let n = 0;
        const t0 = Date.now();
        let nextChat = t0;
        while (Date.now() - t0 < OBSERVE_MS) {
          const h = await timed(server.url + '/health', {}, 1000);
          n++;
          if (h.status !== 200) bad.push(`health at ${Date.now() - t0} ms: ${h.status} ${h.text.slice(0, 80)} (${h.ms} ms)`);
          if (Date.now() >= nextChat) {
            nextChat += 1000;
            const c = await timed(server.baseURL + '/chat/completions', {
              method: 'POST', headers: { 'content-type': 'application/json' },
              body: JSON.stringify(chatBody(ONCE, { max_tokens: 8 })),
            }, 1000);
            let content = null;
            try { content = JSON.parse(c.text).choices[0].message.content; } catch { /* reported below */ }
            if (c.status !== 200 || !GOLDEN[ONCE].startsWith(content ?? '\0'))
              bad.push(`chat at ${Date.now() - t0} ms: ${c.status} ${c.text.slice(0, 80)} (${c.ms} ms)`);
          }
          await sleep(250);
        }
        assert.deepEqual(bad, [], `${bad.length} of ${n} probes failed under the attack (${JSON.stringify(last)})`);
        /* the deadline, not the idle timer (60 s), closed the slow sockets */
        assert.ok(last.slowCut >= N_SLOW * 0.9, `only ${last.slowCut} slowloris sockets were closed in ${OBSERVE_MS} ms ` +
          `with --request-timeout 4: ${JSON.stringify(last)}`);
        assert.equal(server.exited(), null, 'the server died');
      } finally {
        child.kill('SIGTERM');
        await exited;
      }
    });
  });
}
