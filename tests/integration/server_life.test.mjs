/*
 * server_life.test.mjs — what the other files do not cover: a batch of
 * completion prompts (one choice each, SDK and stream), 503 while the model
 * loads, a slow client dropped by --timeout, and the plain curl command line
 * a user would type.
 */
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import net from 'node:net';
import { after, before, describe, it } from 'node:test';
import path from 'node:path';
import {
  BIN, GOLDEN, MODEL, ONCE, SHARED, chatBody, freePort, jfetch, sleep, sse, startServer, tmpDir,
} from './helpers.mjs';

function curl(args, timeoutMs = 20000) {
  return new Promise((resolve, reject) => {
    execFile('curl', ['-sS', '--max-time', String(timeoutMs / 1000), ...args],
      { timeout: timeoutMs + 2000, maxBuffer: 16 << 20 }, (err, stdout, stderr) => {
        if (err && err.code === 'ENOENT') return reject(new Error('curl is not installed'));
        resolve({ code: err ? err.code : 0, stdout, stderr });
      });
  });
}

describe('batches, curl, slow clients', { timeout: 90000 }, () => {
  let server;
  before(async () => { server = await startServer({ args: ['--timeout', '2'] }); });
  after(async () => { if (server) await server.stop(); });

  it('a batch of prompts gives one choice per prompt (SDK)', async () => {
    const sdk = server.client();
    const r = await sdk.completions.create({ prompt: [ONCE, 'The cat', ONCE], max_tokens: 12, temperature: 0 });
    assert.equal(r.choices.length, 3);
    assert.deepEqual(r.choices.map((c) => c.index).sort(), [0, 1, 2]);
    const byIndex = Object.fromEntries(r.choices.map((c) => [c.index, c.text]));
    assert.ok(GOLDEN[ONCE].startsWith(byIndex[0]), byIndex[0]);
    assert.equal(byIndex[0], byIndex[2]);
    assert.notEqual(byIndex[0], byIndex[1]);
    assert.equal(r.usage.completion_tokens, 36);
  });

  it('a streamed batch tags every chunk with its choice index', async () => {
    const { events } = await sse(server.baseURL + '/completions',
      { prompt: [ONCE, 'The cat'], max_tokens: 6, temperature: 0, stream: true });
    const text = { 0: '', 1: '' };
    const finished = new Set();
    for (const e of events) {
      for (const c of e.choices || []) {
        text[c.index] += c.text || '';
        if (c.finish_reason) finished.add(c.index);
      }
    }
    assert.deepEqual([...finished].sort(), [0, 1]);
    assert.ok(GOLDEN[ONCE].startsWith(text[0]), text[0]);
    assert.ok(text[1].length > 0);
  });

  it('a batch on a session is refused (a session is one conversation)', async () => {
    const s = await jfetch(server.baseURL + '/sessions', { body: {} });
    const r = await jfetch(server.baseURL + '/completions', { body: { prompt: ['a', 'b'], session_id: s.json.id } });
    assert.equal(r.status, 400);
    assert.equal(r.json.error.param, 'session_id');
  });

  it('curl: chat, stream, and an error, as the README shows them', async () => {
    const url = server.baseURL + '/chat/completions';
    let r = await curl([url, '-H', 'Content-Type: application/json', '-d',
      JSON.stringify(chatBody(ONCE, { max_tokens: 24, temperature: 0 }))]);
    assert.equal(r.code, 0, r.stderr);
    const j = JSON.parse(r.stdout);
    assert.ok(GOLDEN[ONCE].startsWith(j.choices[0].message.content));
    r = await curl(['-N', url, '-d', JSON.stringify(chatBody(ONCE, { max_tokens: 8, temperature: 0, stream: true }))]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /^data: \{/);
    assert.match(r.stdout, /data: \[DONE\]\n\n$/);
    r = await curl(['-w', '\n%{http_code}', url, '-d', '{"messages": oops}']);
    const lines = r.stdout.trim().split('\n');
    assert.equal(lines.at(-1), '400');
    assert.equal(JSON.parse(lines[0]).error.code, 'invalid_json');
    r = await curl(['-w', '\n%{http_code}', server.url + '/metrics']);
    assert.match(r.stdout, /kvpark_requests_total/);
  });

  it('a client that sends half a request is dropped after --timeout', async () => {
    const port = Number(new URL(server.url).port);
    const sock = net.connect(port, '127.0.0.1');
    await new Promise((res, rej) => { sock.once('connect', res); sock.once('error', rej); });
    sock.write('POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"mess');
    const t0 = Date.now();
    const closed = await Promise.race([
      new Promise((res) => sock.once('close', () => res(true))),
      sleep(10000).then(() => false),
    ]);
    sock.destroy();
    assert.ok(closed, 'the server kept a stalled connection open for 10 s');
    assert.ok(Date.now() - t0 < 8000);
    /* and it still serves */
    const r = await jfetch(server.baseURL + '/chat/completions', { body: chatBody(ONCE, { max_tokens: 4, temperature: 0 }) });
    assert.equal(r.status, 200);
  });
});

describe('while the model loads', { timeout: 60000 }, () => {
  it('/health and the API answer 503, then 200 once loaded', async () => {
    const port = await freePort();
    const dir = tmpDir('load');
    const proc = spawn(BIN, ['serve', '-m', MODEL, '--host', '127.0.0.1', '--port', String(port),
      '--session-dir', dir], { stdio: ['ignore', 'ignore', 'ignore'],
      env: { ...process.env, KVPARK_TEST_LOAD_DELAY_MS: '3000' } });
    try {
      const url = `http://127.0.0.1:${port}`;
      let h = null;
      for (let i = 0; i < 100 && !h; i++) { /* until it listens */
        try { h = await fetch(url + '/health'); } catch { await sleep(30); }
      }
      assert.ok(h, 'the server never started listening');
      assert.equal(h.status, 503);
      assert.match((await h.json()).error.message, /loading/);
      const c = await jfetch(url + '/v1/chat/completions', { body: chatBody(ONCE, { max_tokens: 2 }) });
      assert.equal(c.status, 503);
      let ok = false;
      for (let i = 0; i < 100 && !ok; i++) {
        const r = await fetch(url + '/health');
        ok = r.status === 200;
        if (!ok) await sleep(100);
      }
      assert.ok(ok, 'never became ready');
      const r = await jfetch(url + '/v1/chat/completions', { body: chatBody(ONCE, { max_tokens: 4, temperature: 0 }) });
      assert.equal(r.status, 200);
    } finally {
      proc.kill('SIGKILL');
    }
  });
});

describe('a context the model cannot hold', { timeout: 60000 }, () => {
  const GPT2 = path.join(SHARED, 'models', 'tiny-gpt2.gguf');
  it('--ctx past learned position embeddings stops the start with the limit named', async () => {
    const port = await freePort();
    const r = await new Promise((resolve) => {
      execFile(BIN, ['serve', '-m', GPT2, '--host', '127.0.0.1', '--port', String(port), '-c', '2048',
        '--session-dir', tmpDir('pos')], { timeout: 30000 }, (err, stdout, stderr) => resolve({ err, stderr }));
    });
    assert.equal(r.err && r.err.code, 1, r.stderr);
    assert.match(r.stderr, /--ctx 2048 is more than gpt2's 256 positions .*--ctx 256 or less/);
  });
  it('by default it serves the model\'s positions and a longer request is a 400, not a 500', async () => {
    const server = await startServer({ model: GPT2 });
    try {
      const r = await jfetch(server.baseURL + '/completions', { body: { prompt: 'hello', max_tokens: 300 } });
      assert.equal(r.status, 400);
      assert.equal(r.json.error.code, 'context_length_exceeded');
      assert.match(r.json.error.message, /maximum context length is 256 tokens/);
      const ok = await jfetch(server.baseURL + '/completions', { body: { prompt: 'hello', max_tokens: 250, temperature: 0 } });
      assert.equal(ok.status, 200);
      assert.ok(ok.json.usage.completion_tokens >= 1 && ok.json.usage.completion_tokens <= 250);
    } finally {
      await server.stop();
    }
  });
});

describe('session limit', { timeout: 60000 }, () => {
  let server;
  before(async () => { server = await startServer({ args: ['--max-sessions', '2'] }); });
  after(async () => { if (server) await server.stop(); });

  it('--max-sessions refuses more with 429 until one is deleted', async () => {
    const a = await jfetch(server.baseURL + '/sessions', { body: {} });
    const b = await jfetch(server.baseURL + '/sessions', { body: {} });
    assert.equal(a.status, 200);
    assert.equal(b.status, 200);
    const c = await jfetch(server.baseURL + '/sessions', { body: {} });
    assert.equal(c.status, 429);
    assert.equal(c.json.error.code, 'too_many_sessions');
    const d = await jfetch(server.baseURL + '/sessions/' + a.json.id, { method: 'DELETE' });
    assert.equal(d.status, 200);
    const e = await jfetch(server.baseURL + '/sessions', { body: {} });
    assert.equal(e.status, 200);
  });
});
