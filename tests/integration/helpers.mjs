/*
 * helpers.mjs — shared plumbing for the kvpark integration tests.
 *
 * Why: every *.test.mjs file drives a real `kvpark serve` process over HTTP,
 * the way a user would (the official OpenAI Node SDK, plus raw HTTP for the
 * cases an SDK refuses to send: broken JSON, invalid UTF-8, huge bodies).
 * This file starts and stops those servers safely — a free port on 127.0.0.1,
 * a bounded wait for /health, and a kill that always happens, even when a
 * test fails or the test process itself is interrupted — and holds the small
 * HTTP/SSE helpers and the golden greedy texts the tests compare against.
 *
 * Environment
 *   KVPARK_BIN     the kvpark binary (default: build/kvpark in the repository)
 *   KVPARK_SHARED  the shared test-data folder (default: ../shared next to the repository)
 * Relative values are read from the current directory.
 */
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import OpenAI from 'openai';

const here = path.dirname(fileURLToPath(import.meta.url));
export const REPO = path.resolve(here, '..', '..');
export const BIN = process.env.KVPARK_BIN
  ? path.resolve(process.env.KVPARK_BIN)
  : path.join(REPO, 'build', 'kvpark');
export const SHARED = process.env.KVPARK_SHARED
  ? path.resolve(process.env.KVPARK_SHARED)
  : path.resolve(REPO, '..', 'shared');
export const MODEL = path.join(SHARED, 'models', 'stories260K.gguf');

/* Greedy continuations computed by llama.cpp (golden/README.md): prompt -> the
 * first 64 generated tokens as text, and the prompt's token count with BOS. */
const goldenCases = JSON.parse(
  fs.readFileSync(path.join(SHARED, 'golden', 'stories260K', 'logits.json'), 'utf8'),
).cases;
export const GOLDEN = Object.fromEntries(goldenCases.map((c) => [c.prompt, c.greedy.text]));
export const GOLDEN_PROMPT_TOKENS = Object.fromEntries(goldenCases.map((c) => [c.prompt, c.n_tokens]));
export const GOLDEN_N = 64; /* tokens in each golden continuation (no EOS among them) */
export const ONCE = 'Once upon a time';

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
/* A sleep that does not keep the process alive (for Promise.race deadlines). */
const sleepUnref = (ms) => new Promise((r) => setTimeout(r, ms).unref());

/* ---- servers ------------------------------------------------------- */

/* Every server this process started and has not yet seen exit; killed on any exit path. */
const live = new Set();
function killAll() {
  for (const p of live) {
    try { p.kill('SIGKILL'); } catch { /* already gone */ }
  }
}
process.on('exit', killAll);
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.once(sig, () => { killAll(); process.exit(128 + (os.constants.signals[sig] || 0)); });
}

/* A TCP port that was free a moment ago (listen on 0, read it, close). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

export function tmpDir(tag) {
  return fs.mkdtempSync(path.join(os.tmpdir(), `kvpark-it-${tag}-`));
}

/*
 * Start `kvpark serve -m MODEL --host 127.0.0.1 --port P ...args` and wait
 * (bounded) until GET /health answers 200 (sent with healthKey as a Bearer
 * token when the server has --metrics-key). Returns
 *   { url, baseURL, port, proc, log(), stop(), client(key) }.
 * The caller must `await server.stop()` in an after() hook; the process is
 * also SIGKILLed when the test process exits.
 */
export async function startServer({ args = [], model = MODEL, readyTimeoutMs = 30000, healthKey } = {}) {
  let lastErr;
  for (let attempt = 0; attempt < 3; attempt++) {
    const port = await freePort();
    try {
      return await startOn(port, model, args, readyTimeoutMs, healthKey);
    } catch (e) {
      lastErr = e;
      /* someone took the port between our close and the server's bind: retry */
      if (!/address already in use|EADDRINUSE|bind/i.test(String(e.message))) throw e;
    }
  }
  throw lastErr;
}

/*
 * startServer, but run through a wrapper command: the server is started as
 * `wrap[0] ...wrap.slice(1) BIN serve ...` (e.g. ['bash', '-c', 'ulimit -f 8; exec "$0" "$@"']
 * to start it under a file-size limit). Same options and result as startServer.
 */
export async function startServerWrapped(wrap, { args = [], model = MODEL, readyTimeoutMs = 30000, healthKey } = {}) {
  let lastErr;
  for (let attempt = 0; attempt < 3; attempt++) {
    const port = await freePort();
    try {
      return await startOn(port, model, args, readyTimeoutMs, healthKey, wrap);
    } catch (e) {
      lastErr = e;
      if (!/address already in use|EADDRINUSE|bind/i.test(String(e.message))) throw e;
    }
  }
  throw lastErr;
}

/* kill -9 a server from startServer and wait until it is gone; resolves its exit info. */
export async function killServer(srv) {
  if (srv.exited()) return srv.exited();
  const gone = new Promise((resolve) => srv.proc.once('exit', (code, signal) => resolve({ code, signal })));
  try { srv.proc.kill('SIGKILL'); } catch { /* gone */ }
  return Promise.race([gone, sleepUnref(10000).then(() => srv.exited())]);
}

async function startOn(port, model, args, readyTimeoutMs, healthKey, wrap = null) {
  if (!fs.existsSync(BIN)) throw new Error(`kvpark binary not found at ${BIN} (set KVPARK_BIN or build it)`);
  /* never let a test write ./sessions into the checkout: default to a temp dir */
  let ownDir = null;
  if (!args.includes('--session-dir') && !args.includes('--cold-dir')) {
    ownDir = tmpDir('sess');
    args = [...args, '--session-dir', ownDir];
  }
  // The default codec is auto (int8, then a learned codec calibrated from the
  // prompts): lossy, and it would calibrate in every test. Tests park
  // losslessly unless they pick a codec (or a config file does).
  if (!['--codec', '--profile', '--config', '--print-config', '--calib-text', '--calib-tokens', '--calib-max-kl']
    .some((a) => args.includes(a))) {
    args = [...args, '--codec', 'none'];
  }
  const argv = ['serve', '-m', model, '--host', '127.0.0.1', '--port', String(port), ...args];
  const proc = wrap
    ? spawn(wrap[0], [...wrap.slice(1), BIN, ...argv], { stdio: ['ignore', 'pipe', 'pipe'] })
    : spawn(BIN, argv, { stdio: ['ignore', 'pipe', 'pipe'] });
  live.add(proc);
  let log = '';
  const keep = (d) => { log += d.toString(); if (log.length > 65536) log = log.slice(-65536); };
  proc.stdout.on('data', keep);
  proc.stderr.on('data', keep);
  let exitInfo = null;
  const exited = new Promise((resolve) => {
    proc.once('exit', (code, signal) => {
      exitInfo = { code, signal };
      live.delete(proc);
      if (ownDir) fs.rmSync(ownDir, { recursive: true, force: true });
      resolve(exitInfo);
    });
    proc.once('error', (err) => { exitInfo = { code: null, signal: null, err }; live.delete(proc); resolve(exitInfo); });
  });
  const url = `http://127.0.0.1:${port}`;

  async function stop({ graceMs = 5000 } = {}) {
    if (exitInfo) return exitInfo;
    try { proc.kill('SIGTERM'); } catch { /* gone */ }
    const t0 = Date.now();
    const r = await Promise.race([exited, sleepUnref(graceMs).then(() => null)]);
    if (r) return { ...r, ms: Date.now() - t0 };
    try { proc.kill('SIGKILL'); } catch { /* gone */ }
    const r2 = await Promise.race([exited, sleepUnref(3000).then(() => null)]);
    return { ...(r2 || { code: null, signal: null }), ms: Date.now() - t0, killed: true };
  }

  const deadline = Date.now() + readyTimeoutMs;
  for (;;) {
    if (exitInfo) {
      throw new Error(`kvpark serve exited (code ${exitInfo.code}, signal ${exitInfo.signal}` +
        `${exitInfo.err ? ', ' + exitInfo.err.message : ''}) before /health was ready; ` +
        `argv: ${argv.join(' ')}\n--- server log ---\n${log}`);
    }
    try {
      const r = await fetch(url + '/health', {
        signal: AbortSignal.timeout(2000),
        headers: healthKey ? { authorization: `Bearer ${healthKey}` } : {},
      });
      await r.arrayBuffer();
      if (r.status === 200) break;
    } catch { /* not listening yet */ }
    if (Date.now() > deadline) {
      await stop();
      throw new Error(`kvpark serve not ready after ${readyTimeoutMs} ms; argv: ${argv.join(' ')}\n` +
        `--- server log ---\n${log}`);
    }
    await sleep(50);
  }

  return {
    port, url, baseURL: url + '/v1', proc, argv,
    log: () => log,
    exited: () => exitInfo,
    stop,
    client: (apiKey = 'sk-none', opts = {}) =>
      new OpenAI({ apiKey, baseURL: url + '/v1', maxRetries: 0, timeout: 30000, ...opts }),
  };
}

/* ---- HTTP ------------------------------------------------------------ */

/*
 * A request with node's http module: works for bodies fetch would not send
 * as-is (raw bytes, chunked uploads of any size) and keeps the response even
 * when the server answers early and closes while we are still uploading.
 * body: string | Buffer | undefined. chunked: true -> no Content-Length.
 * Resolves { status, headers, text, json } (json null when not JSON).
 */
export function rawRequest(url, { method = 'GET', headers = {}, body, chunked = false, timeoutMs = 20000 } = {}) {
  return new Promise((resolve, reject) => {
    const u = new URL(url);
    const buf = body === undefined ? null : Buffer.isBuffer(body) ? body : Buffer.from(body);
    const h = { ...headers };
    if (buf && !chunked) h['content-length'] = String(buf.length);
    if (buf && !h['content-type'] && !h['Content-Type']) h['content-type'] = 'application/json';
    let settled = false;
    let responded = false;
    const req = http.request({
      host: u.hostname, port: u.port, path: u.pathname + u.search, method, headers: h,
      agent: false,
    });
    const timer = setTimeout(() => {
      if (!settled) { settled = true; req.destroy(); reject(new Error(`${method} ${url}: no response in ${timeoutMs} ms`)); }
    }, timeoutMs);
    req.on('response', (res) => {
      responded = true;
      const parts = [];
      res.on('data', (d) => parts.push(d));
      res.on('end', () => {
        clearTimeout(timer);
        if (settled) return;
        settled = true;
        const text = Buffer.concat(parts).toString('utf8');
        let json = null;
        try { json = JSON.parse(text); } catch { /* not JSON */ }
        resolve({ status: res.statusCode, headers: res.headers, text, json });
      });
      res.on('error', (e) => { clearTimeout(timer); if (!settled) { settled = true; reject(e); } });
    });
    req.on('error', (e) => {
      /* EPIPE / ECONNRESET after the server answered early: the response wins */
      if (responded) return;
      clearTimeout(timer);
      if (!settled) { settled = true; reject(e); }
    });
    if (!buf) { req.end(); return; }
    /* write in 256 KiB slices, honouring back-pressure, stop once answered */
    let off = 0;
    const slice = 256 * 1024;
    const pump = () => {
      while (off < buf.length && !responded && !req.destroyed) {
        const ok = req.write(buf.subarray(off, Math.min(off + slice, buf.length)));
        off += slice;
        if (!ok) { req.once('drain', pump); return; }
      }
      req.end();
    };
    pump();
  });
}

/* fetch's "fetch failed" says nothing: name the request, when, and the cause
 * (ECONNRESET, "other side closed", a timeout), so a failure says why. */
function fetchError(e, method, url, t0) {
  const c = e.cause;
  const why = c ? `${c.code ?? c.name ?? ''} ${c.message ?? ''}`.trim() : '';
  return new Error(`${method} ${url}: ${e.message}${why ? ` (${why})` : ''} after ${Date.now() - t0} ms`, { cause: e });
}

/* JSON POST (or any method) with fetch; resolves { status, headers, json, text }. */
export async function jfetch(url, { method = 'POST', body, headers = {}, timeoutMs = 30000 } = {}) {
  const init = { method, headers: { ...headers }, signal: AbortSignal.timeout(timeoutMs) };
  if (body !== undefined) {
    init.body = typeof body === 'string' ? body : JSON.stringify(body);
    init.headers['content-type'] = 'application/json';
  }
  const t0 = Date.now();
  let r;
  let text;
  try {
    r = await fetch(url, init);
    text = await r.text();
  } catch (e) { throw fetchError(e, method, url, t0); }
  let json = null;
  try { json = JSON.parse(text); } catch { /* not JSON */ }
  return { status: r.status, headers: r.headers, json, text };
}

/*
 * POST a streaming request and read the whole SSE response.
 * Resolves { status, headers, events: [parsed data objects], done (saw [DONE]), raw }.
 */
export async function sse(url, body, { headers = {}, timeoutMs = 30000 } = {}) {
  const t0 = Date.now();
  let r;
  let raw;
  try {
    r = await fetch(url, {
      method: 'POST',
      headers: { 'content-type': 'application/json', ...headers },
      body: JSON.stringify(body),
      signal: AbortSignal.timeout(timeoutMs),
    });
    raw = await r.text();
  } catch (e) { throw fetchError(e, 'POST', url, t0); }
  const events = [];
  let done = false;
  for (const block of raw.split(/\r?\n\r?\n/)) {
    const data = block.split(/\r?\n/).filter((l) => l.startsWith('data:'))
      .map((l) => l.slice(5).replace(/^ /, '')).join('\n');
    if (!data) continue;
    if (data === '[DONE]') { done = true; continue; }
    events.push(JSON.parse(data));
  }
  return { status: r.status, headers: r.headers, events, done, raw };
}

/* The OpenAI error shape: {"error":{"message","type","param","code"}}. */
export function assertErrorShape(assert, json, { type, code, param } = {}) {
  assert.ok(json && typeof json === 'object', `error body is not JSON: ${JSON.stringify(json)}`);
  const e = json.error;
  assert.ok(e && typeof e === 'object', `no "error" object in ${JSON.stringify(json)}`);
  assert.equal(typeof e.message, 'string');
  assert.ok(e.message.length > 0, 'empty error message');
  assert.equal(typeof e.type, 'string');
  assert.ok('param' in e, `"param" missing in ${JSON.stringify(e)}`);
  assert.ok('code' in e, `"code" missing in ${JSON.stringify(e)}`);
  if (type !== undefined) assert.equal(e.type, type, JSON.stringify(e));
  if (code !== undefined) assert.equal(e.code, code, JSON.stringify(e));
  if (param !== undefined) assert.equal(e.param, param, JSON.stringify(e));
}

/* A one-message greedy chat body. */
export function chatBody(content, extra = {}) {
  return { model: 'stories260K', messages: [{ role: 'user', content }], temperature: 0, ...extra };
}

/* Run an SDK streaming chat and collect { text, finish, chunks, usage, role }. */
export async function collectStream(stream) {
  let text = '';
  let finish = null;
  let usage = null;
  let role = null;
  const chunks = [];
  for await (const chunk of stream) {
    chunks.push(chunk);
    if (chunk.usage) usage = chunk.usage;
    for (const c of chunk.choices || []) {
      if (c.delta?.role) role = c.delta.role;
      if (typeof c.delta?.content === 'string') text += c.delta.content;
      if (typeof c.text === 'string') text += c.text;
      if (c.finish_reason) finish = c.finish_reason;
    }
  }
  return { text, finish, chunks, usage, role };
}

/* ---- sessions and metrics (tiers, faults) ---------------------------- */

/* POST /v1/sessions -> the new session's id (asserts 200). */
export async function newSession(srv, headers = {}) {
  const r = await jfetch(srv.url + '/v1/sessions', { body: {}, headers });
  assert.equal(r.status, 200, r.text);
  return r.json.id;
}

/* GET /v1/sessions as { id: entry } (asserts 200). */
export async function listSessions(srv, headers = {}) {
  const r = await jfetch(srv.url + '/v1/sessions', { method: 'GET', headers });
  assert.equal(r.status, 200, r.text);
  return Object.fromEntries(r.json.data.map((e) => [e.id, e]));
}

/* The sum of the samples of metric `name` (Prometheus text) whose labels include `labels`. */
export function metricValue(text, name, labels = {}) {
  let sum = 0;
  for (const line of text.split('\n')) {
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? ([0-9.e+-]+)$/);
    if (!m || m[1] !== name) continue;
    if (!Object.entries(labels).every(([k, v]) => (m[2] || '').includes(`${k}="${v}"`))) continue;
    sum += Number(m[3]);
  }
  return sum;
}

/* Poll fn() until it returns something truthy (returned), or throw after ms. */
/* A throwaway redis-server on 127.0.0.1 (no persistence, files in dir):
 * { port, proc }. port: a given one (a restart on the same address), else
 * a free one; extra: more redis-server flags ("--maxmemory", "1mb", ...). */
export async function startRedis(dir, { port, extra = [] } = {}) {
  port = port || await freePort();
  const proc = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no',
    '--dir', dir, ...extra], { stdio: 'ignore' });
  for (let i = 0; i < 100; i++) {
    const r = spawnSync('redis-cli', ['-p', String(port), 'ping'], { encoding: 'utf8' });
    if (r.stdout && r.stdout.includes('PONG')) return { port, proc };
    await sleep(50);
  }
  proc.kill('SIGKILL');
  throw new Error('redis-server did not start');
}

/* redis-cli -p port ARGS..., its output. */
export function redisCli(port, ...args) {
  return spawnSync('redis-cli', ['-p', String(port), ...args], { encoding: 'utf8' }).stdout || '';
}

export async function waitFor(what, fn, ms = 10000) {
  const t0 = Date.now();
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() - t0 > ms) assert.fail(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(25);
  }
}

/* ---- Prometheus exposition, checked strictly ---------------------------- */

const METRIC_NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*/;
const LABEL_NAME = /^[a-zA-Z_][a-zA-Z0-9_]*/;
const PROM_VALUE = /^(?:[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|[+-]?Inf|NaN)$/;
const PROM_TYPES = new Set(['counter', 'gauge', 'histogram', 'summary', 'untyped']);
const promNumber = (s) => (s === '+Inf' || s === 'Inf' ? Infinity : s === '-Inf' ? -Infinity : Number(s));

/* Undo the escapes of a label value (\\ \" \n) or HELP text (\\ \n); any
 * other backslash sequence is an error. */
function promUnescape(s, quote, where) {
  let out = '';
  for (let i = 0; i < s.length; i++) {
    if (s[i] !== '\\') { out += s[i]; continue; }
    const n = s[++i];
    if (n === '\\') out += '\\';
    else if (n === 'n') out += '\n';
    else if (quote && n === '"') out += '"';
    else throw new Error(`${where}: bad escape "\\${n ?? ''}"`);
  }
  return out;
}

/*
 * Parse Prometheus text format 0.0.4 the strict way and throw on anything a
 * scraper could misread: # HELP and # TYPE at most once per family and
 * before its samples; every sample in a family with a # TYPE (and # HELP);
 * a family's samples contiguous; metric and label names valid, no label
 * twice, values quoted with only \\ \" \n escapes; numbers Prometheus parses
 * (+Inf, -Inf, NaN); no duplicate series (same name and label set); counters
 * >= 0; histograms with increasing le, cumulative buckets ending at +Inf equal
 * to _count, and a _sum. Blank lines and a missing final newline are refused
 * too (the format tolerates them; kvpark never writes them).
 * Returns Map name -> { help, type, samples: [{ name, labels, value }] }.
 */
export function parseExposition(text) {
  if (text.length && !text.endsWith('\n')) throw new Error('exposition does not end with a newline');
  if (text.includes('\r')) throw new Error('exposition contains \\r');
  const fams = new Map();
  const closed = new Set();
  const series = new Set();
  let current = null;
  const fam = (name) => {
    if (!fams.has(name)) fams.set(name, { help: undefined, type: undefined, samples: [], started: false });
    return fams.get(name);
  };
  const familyOf = (name) => {
    if (fams.get(name)?.type) return name;
    for (const [suffix, types] of [['_bucket', ['histogram']], ['_sum', ['histogram', 'summary']], ['_count', ['histogram', 'summary']]]) {
      if (!name.endsWith(suffix)) continue;
      const base = name.slice(0, -suffix.length);
      if (types.includes(fams.get(base)?.type)) return base;
    }
    return null;
  };
  const lines = text.split('\n');
  lines.pop();
  lines.forEach((line, i) => {
    const at = `line ${i + 1} "${line.slice(0, 120)}"`;
    if (line === '') throw new Error(`${at}: blank line`);
    if (line.startsWith('#')) {
      const m = line.match(/^# (HELP|TYPE) ([^ ]+)(?: (.*))?$/);
      if (!m) {
        const bad = line.match(/^#\s*(HELP|TYPE)\b/);
        if (bad) throw new Error(`${at}: malformed ${bad[1]} line`);
        return; /* a plain comment */
      }
      const [, kind, name, rest = ''] = m;
      if (!METRIC_NAME.test(name) || name.match(METRIC_NAME)[0] !== name) throw new Error(`${at}: bad metric name`);
      const f = fam(name);
      if (f.started) throw new Error(`${at}: # ${kind} after samples of ${name}`);
      if (kind === 'HELP') {
        if (f.help !== undefined) throw new Error(`${at}: second # HELP for ${name}`);
        f.help = promUnescape(rest, false, at);
      } else {
        if (f.type !== undefined) throw new Error(`${at}: second # TYPE for ${name}`);
        if (!PROM_TYPES.has(rest)) throw new Error(`${at}: unknown type "${rest}"`);
        f.type = rest;
      }
      return;
    }
    /* name{labels} value [timestamp] */
    const nm = line.match(METRIC_NAME);
    if (!nm) throw new Error(`${at}: no metric name`);
    const name = nm[0];
    let p = name.length;
    const labels = {};
    if (line[p] === '{') {
      p++;
      while (line[p] !== '}') {
        const ln = line.slice(p).match(LABEL_NAME);
        if (!ln) throw new Error(`${at}: bad label name at column ${p + 1}`);
        const lname = ln[0];
        if (lname.startsWith('__')) throw new Error(`${at}: reserved label name ${lname}`);
        if (lname in labels) throw new Error(`${at}: label ${lname} twice`);
        p += lname.length;
        if (line.slice(p, p + 2) !== '="') throw new Error(`${at}: expected =" after ${lname}`);
        p += 2;
        let raw = '';
        while (p < line.length && line[p] !== '"') {
          if (line[p] === '\\') { raw += line.slice(p, p + 2); p += 2; } else raw += line[p++];
        }
        if (line[p] !== '"') throw new Error(`${at}: unterminated value of ${lname}`);
        p++;
        labels[lname] = promUnescape(raw, true, at);
        if (line[p] === ',') {
          p++;
          if (line[p] === '}') throw new Error(`${at}: trailing comma in labels`);
        } else if (line[p] !== '}') throw new Error(`${at}: expected , or } at column ${p + 1}`);
      }
      p++;
    }
    const tail = line.slice(p);
    const vm = tail.match(/^ ([^ ]+)(?: (-?\d+))?$/);
    if (!vm || !PROM_VALUE.test(vm[1])) throw new Error(`${at}: bad value`);
    const value = promNumber(vm[1]);
    const base = familyOf(name);
    if (!base) throw new Error(`${at}: sample without a # TYPE for its family`);
    const f = fams.get(base);
    if (f.help === undefined) throw new Error(`${at}: family ${base} has no # HELP`);
    if (current !== base) {
      if (closed.has(base)) throw new Error(`${at}: samples of ${base} are not contiguous`);
      if (current) closed.add(current);
      current = base;
    }
    f.started = true;
    const key = name + JSON.stringify(Object.entries(labels).sort(([a], [b]) => (a < b ? -1 : 1)));
    if (series.has(key)) throw new Error(`${at}: duplicate series`);
    series.add(key);
    if (f.type === 'counter' && !(value >= 0)) throw new Error(`${at}: counter value ${vm[1]} is not >= 0`);
    if ('le' in labels && !(f.type === 'histogram' && name === base + '_bucket')) throw new Error(`${at}: le outside a histogram bucket`);
    if (f.type === 'histogram' && name === base + '_bucket' && !('le' in labels)) throw new Error(`${at}: bucket without le`);
    f.samples.push({ name, labels, value });
  });
  /* histogram shape, per label set */
  for (const [name, f] of fams) {
    if (f.type !== 'histogram') continue;
    const groups = new Map();
    for (const s of f.samples) {
      const { le, ...rest } = s.labels;
      const k = JSON.stringify(Object.entries(rest).sort());
      if (!groups.has(k)) groups.set(k, { buckets: [], sum: undefined, count: undefined });
      const g = groups.get(k);
      if (s.name === name + '_bucket') {
        if (!PROM_VALUE.test(le)) throw new Error(`${name}${k}: bad le "${le}"`);
        g.buckets.push([promNumber(le), s.value]);
      } else if (s.name === name + '_sum') g.sum = s.value;
      else if (s.name === name + '_count') g.count = s.value;
      else throw new Error(`${name}: sample ${s.name} in a histogram`);
    }
    for (const [k, g] of groups) {
      const where = `${name}${k}`;
      if (g.sum === undefined || g.count === undefined) throw new Error(`${where}: _sum or _count missing`);
      if (!g.buckets.length || g.buckets[g.buckets.length - 1][0] !== Infinity) throw new Error(`${where}: no le="+Inf" bucket last`);
      for (let i = 1; i < g.buckets.length; i++) {
        if (!(g.buckets[i][0] > g.buckets[i - 1][0])) throw new Error(`${where}: le not increasing`);
        if (g.buckets[i][1] < g.buckets[i - 1][1]) throw new Error(`${where}: buckets not cumulative`);
      }
      if (g.buckets[g.buckets.length - 1][1] !== g.count) throw new Error(`${where}: +Inf bucket != _count`);
    }
  }
  for (const [name, f] of fams) {
    if (f.type === undefined) throw new Error(`# HELP for ${name} without a # TYPE`);
    delete f.started;
  }
  return fams;
}

/* Every series of a parsed exposition as 'name{a="x",b="y"}' -> value. */
export function exposedSeries(fams) {
  const out = new Map();
  for (const f of fams.values()) {
    for (const s of f.samples) {
      const l = Object.entries(s.labels).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(',');
      out.set(l ? `${s.name}{${l}}` : s.name, s.value);
    }
  }
  return out;
}

/* VmRSS of a process in bytes (Linux /proc), or null when unreadable. */
export function rssBytes(pid) {
  try {
    const m = fs.readFileSync(`/proc/${pid}/status`, 'utf8').match(/^VmRSS:\s+(\d+) kB$/m);
    return m ? Number(m[1]) * 1024 : null;
  } catch { return null; }
}
