/*
 * soak.test.mjs — 32 streaming clients for 30 s against one server that parks
 * all the time (a hot budget of about three sessions, idle parking after
 * 0.25 s, a warm budget so small that parked sessions spill to disk):
 * half of the clients run conversations (create a session, chat, stay idle
 * until it is parked, chat again, delete it), half send anonymous requests.
 * Passes only with 0 errors, every text equal to what one client alone gets
 * from a server that never parks (greedy) and every token's logprob within
 * 1e-3 of it (a KV row zeroed on restore leaves most greedy texts intact but
 * moves logprobs by ~5e-2; clean runs differ by < 1e-5), sessions really parked and
 * resumed, kvpark_requests_total equal to the requests made, the server's
 * RSS flat after warm-up (end <= 110 % of the RSS at 8 s and 1000 requests),
 * no sanitizer report on its output, and a clean exit.
 *
 * Why: parking bugs show up only under load and over time: a restore racing
 * a park, a KV slot reused too early, memory that grows per request.
 *
 * Env: KVPARK_SOAK_S (seconds of load, default 30), KVPARK_SOAK_CLIENTS
 * (default 32), KVPARK_SOAK_ASAN_EXTRA (ASan options added for the server,
 * default quarantine_size_mb=16).
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { after, before, describe, it } from 'node:test';
import {
  exposedSeries, jfetch, metricValue, parseExposition, rssBytes, sleep, sse, startServer, tmpDir, waitFor,
} from './helpers.mjs';

const SOAK_MS = 1000 * Number(process.env.KVPARK_SOAK_S || 30);
const CLIENTS = Number(process.env.KVPARK_SOAK_CLIENTS || 32);
/* The RSS baseline is taken after warm-up: 8 s and 1000 chat requests (an
 * ASan build does the same work about 4x slower, and its allocator's
 * per-size-class pools fill with work, not time), or half the run at the
 * latest on a slow machine. */
const WARMUP_MS = Math.min(8000, SOAK_MS / 3);
const WARMUP_REQUESTS = 1000;
const PROMPTS = ['Once upon a time', 'Lily wanted to', 'The cat sat on', 'Tom had a big', 'One day a bird'];
const NEXT = 'What happened next?';
const TURN_TOKENS = 16;
const ANON_TOKENS = 24;
const SANITIZER = /ERROR: AddressSanitizer|ERROR: LeakSanitizer|runtime error:|ThreadSanitizer|SUMMARY: UndefinedBehaviorSanitizer/;

const body = (messages, max, extra = {}) => ({ model: 'm', temperature: 0, max_tokens: max, messages, ...extra });

/* One streamed chat; resolves { text, lp: the chosen tokens' logprobs }, or
 * throws with what went wrong. */
async function streamChat(srv, messages, max, extra = {}) {
  const r = await sse(srv.baseURL + '/chat/completions', body(messages, max, { ...extra, stream: true, logprobs: true }), { timeoutMs: 60000 });
  if (r.status !== 200) throw new Error(`status ${r.status}: ${r.raw.slice(0, 300)}`);
  if (!r.done) throw new Error(`stream ended without [DONE]: ${r.raw.slice(-300)}`);
  let text = '';
  let finish = null;
  const lp = [];
  for (const e of r.events) {
    if (e.error) throw new Error(`error event: ${JSON.stringify(e.error)}`);
    for (const c of e.choices || []) {
      if (typeof c.delta?.content === 'string') text += c.delta.content;
      for (const t of c.logprobs?.content || []) lp.push(t.logprob);
      if (c.finish_reason) finish = c.finish_reason;
    }
  }
  if (!finish) throw new Error('no finish_reason');
  if (lp.length !== max) throw new Error(`${lp.length} logprobs for ${max} tokens`);
  return { text, lp };
}

/* The single-client answers (text and logprobs), by the same path as in the
 * soak (a session's two turns, an anonymous request) on a server that never
 * parks. */
async function reference(srv) {
  const ref = {};
  for (const p of PROMPTS) {
    const c = await jfetch(srv.url + '/v1/sessions', { body: {} });
    assert.equal(c.status, 200, c.text);
    const t1 = await streamChat(srv, [{ role: 'user', content: p }], TURN_TOKENS, { session_id: c.json.id });
    const t2 = await streamChat(srv, [{ role: 'user', content: p }, { role: 'assistant', content: t1.text }, { role: 'user', content: NEXT }],
      TURN_TOKENS, { session_id: c.json.id });
    const anon = await streamChat(srv, [{ role: 'user', content: p }], ANON_TOKENS);
    ref[p] = { t1, t2, anon };
  }
  return ref;
}

/* Logprobs may differ by float rounding (a restored KV is bit-exact with the
 * lossless default codec, but batching can change the summation order);
 * anything past this is a different computation. */
const LOGPROB_TOL = 1e-3;

describe('soak', { timeout: SOAK_MS + 150000 }, () => {
  let ref;
  let srv;
  let dir;
  let sanitizerReport = '';
  before(async () => {
    const plain = await startServer({ args: ['-c', '256', '--quiet'] });
    try {
      ref = await reference(plain);
    } finally {
      await plain.stop();
    }
    dir = tmpDir('soak');
    /* Under ASan, freed memory waits in a quarantine (256 MB by default)
     * before reuse, so RSS climbs for a long while without any leak: keep it
     * at 16 MB for this server only, so that RSS flattens after warm-up like
     * the release build's. Harmless for a binary without ASan. */
    const saved = process.env.ASAN_OPTIONS;
    process.env.ASAN_OPTIONS = `${saved ? saved + ':' : ''}${process.env.KVPARK_SOAK_ASAN_EXTRA || 'quarantine_size_mb=16'}`;
    try {
      srv = await startServer({
        args: [
          '-c', '256', '--parallel', '8', '--queue', '256', '--quiet',
          '--hot-budget', '1M', /* about three hot sessions of -c 256 */
          '--idle-park', '0.25', '--warm-budget', '64K', '--cold-dir', dir,
        ],
      });
    } finally {
      if (saved === undefined) delete process.env.ASAN_OPTIONS;
      else process.env.ASAN_OPTIONS = saved;
    }
    /* Scan all of its output (srv.log() keeps only the last 64 KiB). */
    let tail = '';
    const scan = (d) => {
      const s = tail + d.toString();
      if (!sanitizerReport && SANITIZER.test(s)) sanitizerReport = s.slice(0, 4000);
      tail = s.slice(-200);
    };
    srv.proc.stderr.on('data', scan);
    srv.proc.stdout.on('data', scan);
  });
  after(async () => {
    await srv?.stop();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  it(`${CLIENTS} streaming clients for ${SOAK_MS / 1000} s while sessions park and resume: no error, same texts, flat RSS`, async () => {
    const errors = [];
    const count = { chat: 0, cycles: 0, anon: 0 };
    const fail = (who, what, e) => { errors.push(`${who} ${what}: ${e.message ?? e}`); };
    let maxDelta = 0;
    const expect = (who, what, got, want) => {
      if (got.text !== want.text) {
        errors.push(`${who} ${what}: got ${JSON.stringify(got.text)}, want ${JSON.stringify(want.text)}`);
        return;
      }
      for (let j = 0; j < want.lp.length; j++) {
        const d = Math.abs(got.lp[j] - want.lp[j]);
        maxDelta = Math.max(maxDelta, d);
        if (!(d <= LOGPROB_TOL)) {
          errors.push(`${who} ${what}: token ${j} logprob ${got.lp[j]}, want ${want.lp[j]} (same text)`);
          return;
        }
      }
    };
    const t0 = Date.now();
    const deadline = t0 + SOAK_MS;

    const conversation = async (i) => {
      for (let k = 0; Date.now() < deadline; k++) {
        const p = PROMPTS[(i + k) % PROMPTS.length];
        const who = `session client ${i} cycle ${k} (${JSON.stringify(p)})`;
        try {
          const c = await jfetch(srv.url + '/v1/sessions', { body: {} });
          if (c.status !== 200) throw new Error(`create: status ${c.status}: ${c.text}`);
          const sid = c.json.id;
          const m1 = [{ role: 'user', content: p }];
          const t1 = await streamChat(srv, m1, TURN_TOKENS, { session_id: sid });
          count.chat++;
          expect(who, 'turn 1', t1, ref[p].t1);
          await sleep(300 + Math.floor(Math.random() * 500)); /* idle: past --idle-park */
          const t2 = await streamChat(srv, [...m1, { role: 'assistant', content: t1.text }, { role: 'user', content: NEXT }], TURN_TOKENS, { session_id: sid });
          count.chat++;
          expect(who, 'turn 2 (resumed)', t2, ref[p].t2);
          const d = await jfetch(srv.url + `/v1/sessions/${sid}`, { method: 'DELETE' });
          if (d.status !== 200) throw new Error(`delete: status ${d.status}: ${d.text}`);
          count.cycles++;
        } catch (e) {
          fail(who, 'request', e);
        }
      }
    };
    const anonymous = async (i) => {
      for (let k = 0; Date.now() < deadline; k++) {
        const p = PROMPTS[(i * 3 + k) % PROMPTS.length];
        try {
          const t = await streamChat(srv, [{ role: 'user', content: p }], ANON_TOKENS);
          count.chat++;
          count.anon++;
          expect(`anonymous client ${i} request ${k}`, JSON.stringify(p), t, ref[p].anon);
        } catch (e) {
          fail(`anonymous client ${i} request ${k}`, 'request', e);
        }
      }
    };

    /* RSS every second. The check compares the median of the three samples
     * around the end of warm-up with the median of the last three (RSS
     * moves by a few MiB from one second to the next with the requests in
     * flight). Measured here: the release build grows ~3 % and levels off;
     * an ASan build creeps 4-9 % in 30 s while the heap in use stays flat
     * (__sanitizer_get_current_allocated_bytes read with gdb: 13-18 MB
     * throughout): that is the sanitizer's own pools and shadow, which is
     * why the limit is the 10 % and not tighter. A leak of 32 KiB
     * per request is caught by this check in a release build and by
     * LeakSanitizer (exit status, stderr) in an ASan one. */
    const trace = [];
    let warmIdx = -1;
    let warmAt = '';
    const sampler = (async () => {
      while (Date.now() < deadline) {
        await sleep(Math.min(1000, Math.max(0, deadline - Date.now())));
        trace.push(rssBytes(srv.proc.pid));
        const ms = Date.now() - t0;
        if (warmIdx < 0 && ((ms >= WARMUP_MS && count.chat >= WARMUP_REQUESTS) || ms >= SOAK_MS / 2)) {
          warmIdx = trace.length - 1;
          warmAt = `${(ms / 1000).toFixed(0)} s, ${count.chat} requests`;
        }
      }
    })();
    await Promise.all(Array.from({ length: CLIENTS }, (_, i) => (i % 2 ? anonymous(i) : conversation(i))));
    await sampler;
    trace.push(rssBytes(srv.proc.pid));
    const median3 = (v) => [...v].sort((x, y) => x - y)[Math.floor(v.length / 2)];
    const rssWarm = warmIdx >= 0 ? median3(trace.slice(Math.max(0, warmIdx - 1), warmIdx + 2)) : null;
    const rssEnd = median3(trace.slice(-3));
    const secs = (Date.now() - t0) / 1000;

    /* every request counted once its connection is done */
    const text = await waitFor('the metrics to count every chat request', async () => {
      const t = (await jfetch(srv.url + '/metrics', { method: 'GET' })).text;
      return metricValue(t, 'kvpark_requests_total', { endpoint: 'chat_completions', status: '200' }) >= count.chat ? t : null;
    }, 10000).catch(() => null);
    const metrics = text ?? (await jfetch(srv.url + '/metrics', { method: 'GET' })).text;
    const series = exposedSeries(parseExposition(metrics));
    const restores = metricValue(metrics, 'kvpark_session_events_total', { event: 'restore' });
    const restoresCold = metricValue(metrics, 'kvpark_session_events_total', { event: 'restore', tier: 'cold' });
    console.log(`# soak: ${CLIENTS} clients, ${secs.toFixed(1)} s: ${count.chat} chat requests, ${count.cycles} park/resume ` +
      `cycles, ${count.anon} anonymous; largest logprob difference ${maxDelta.toExponential(1)}; restores ${restores} (${restoresCold} from disk); ` +
      `RSS ${(rssWarm / 1048576).toFixed(1)} MiB at ${warmAt} -> ${(rssEnd / 1048576).toFixed(1)} MiB at the end ` +
      `(MiB each second: ${trace.map((v) => (v / 1048576).toFixed(0)).join(' ')})`);

    /* Stop it first: LeakSanitizer reports at exit. */
    const exit = await srv.stop({ graceMs: 20000 });
    assert.deepEqual(errors.slice(0, 10), [], `${errors.length} errors`);
    assert.equal(sanitizerReport, '', 'sanitizer report on the server\'s output');
    assert.deepEqual({ code: exit.code, signal: exit.signal, killed: !!exit.killed }, { code: 0, signal: null, killed: false },
      `unclean exit; log tail:\n${srv.log().slice(-3000)}`);
    assert.ok(count.cycles >= CLIENTS / 2, `only ${count.cycles} conversations completed`);
    assert.ok(count.anon >= CLIENTS / 2, `only ${count.anon} anonymous requests completed`);
    /* The idle gap is past --idle-park, so (nearly) every second turn resumed a parked session. */
    assert.ok(restores >= count.cycles / 2, `${restores} restores for ${count.cycles} conversations: sessions were not parked`);
    assert.equal(series.get('kvpark_requests_total{endpoint="chat_completions",status="200"}'), count.chat, 'kvpark_requests_total');
    /* nothing but 200s (/health answers 503 while the model loads: startServer polls it) */
    for (const [k, v] of series) {
      if (k.startsWith('kvpark_requests_total{') && !/status="200"/.test(k) && !/endpoint="health"/.test(k)) {
        assert.equal(v, 0, `${k} is ${v}`);
      }
    }
    assert.equal(series.get('kvpark_requests_running'), 0);
    assert.equal(series.get('kvpark_requests_waiting'), 0);
    assert.ok(rssWarm > 0 && rssEnd > 0, 'cannot read the server\'s RSS');
    assert.ok(rssEnd <= rssWarm * 1.1,
      `RSS grew after warm-up: ${rssWarm} -> ${rssEnd} bytes (+${(100 * (rssEnd / rssWarm - 1)).toFixed(1)} %)`);

  });
});
