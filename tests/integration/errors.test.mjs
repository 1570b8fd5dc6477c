/*
 * errors.test.mjs — how `kvpark serve` refuses bad requests: every error
 * status of the contract (400, 401, 404, 413) in the OpenAI error shape,
 * hostile bodies (invalid UTF-8, 100k-deep nesting, 10 MB uploads with and
 * without Content-Length), and that the server keeps answering afterwards.
 * The request line and framing too: a request with both Content-Length and
 * Transfer-Encoding is refused (400, connection closed: the classic request
 * smuggling setup behind a proxy), an absolute-URI request line
 * ("POST http://host:port/v1/...", which HTTP/1.1 servers must accept)
 * routes like its path, and --host takes IPv6 (::1, and :: for both
 * families; skipped where the machine has no ::1).
 *
 * Why: a public endpoint meets these inputs daily; each must end in a clear
 * error, never a crash, a hang, or a silently accepted request.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import OpenAI from 'openai';
import {
  BIN, GOLDEN, MODEL, ONCE, assertErrorShape, chatBody, freePort, jfetch, rawRequest, sleep, startServer, tmpDir,
} from './helpers.mjs';

/* Write raw bytes on a fresh socket to host:port and read until the server
 * closes (or timeoutMs: then resolves what came, with closed false). */
function rawExchange(port, bytes, { host = '127.0.0.1', timeoutMs = 10000 } = {}) {
  return new Promise((resolve, reject) => {
    const sock = net.connect(port, host);
    const parts = [];
    const done = (closed) => { clearTimeout(timer); sock.destroy(); resolve({ text: Buffer.concat(parts).toString('utf8'), closed }); };
    const timer = setTimeout(() => done(false), timeoutMs);
    sock.on('connect', () => sock.write(bytes));
    sock.on('data', (d) => parts.push(d));
    sock.on('error', (e) => { clearTimeout(timer); reject(e); });
    sock.on('close', () => done(true));
  });
}

/* The body of the first response in a raw HTTP/1.1 exchange (Content-Length framed). */
function firstBody(text) {
  const sep = text.indexOf('\r\n\r\n');
  const len = Number(/content-length:\s*(\d+)/i.exec(text.slice(0, sep))?.[1] ?? -1);
  return len >= 0 ? text.slice(sep + 4, sep + 4 + len) : text.slice(sep + 4);
}

const KEY = 'k-alpha-0123456789';
const FILE_KEY = 'k-beta-from-file';
const MAX_BODY = 1 << 20;

describe('errors', { timeout: 90000 }, () => {
  let server;
  let dir;
  const auth = { authorization: `Bearer ${KEY}` };
  const post = (p, body, headers = auth) => jfetch(server.url + p, { body, headers });
  const chat = (body, headers = auth) => post('/v1/chat/completions', body, headers);
  const rawChat = (bytes, extra = {}) => rawRequest(server.url + '/v1/chat/completions',
    { method: 'POST', headers: { ...auth }, body: bytes, ...extra });

  before(async () => {
    dir = tmpDir('errors');
    const keyFile = path.join(dir, 'keys.txt');
    fs.writeFileSync(keyFile, FILE_KEY + '\n');
    fs.mkdirSync(path.join(dir, 'sessions'));
    server = await startServer({
      args: ['-c', '256', '--api-key', KEY, '--api-key-file', keyFile, '--max-body', String(MAX_BODY),
        '--session-dir', path.join(dir, 'sessions')],
    });
  });
  after(async () => {
    if (server) await server.stop();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  /* ---- 401 ---- */

  it('401 without a key, with a wrong key, an empty key or another scheme', async () => {
    for (const headers of [{}, { authorization: 'Bearer wrong-key' }, { authorization: 'Bearer ' },
      { authorization: `Basic ${KEY}` }, { authorization: `Bearer ${KEY}x` }, { authorization: `Bearer ${KEY.slice(0, -1)}` }]) {
      const r = await chat(chatBody(ONCE, { max_tokens: 2 }), headers);
      assert.equal(r.status, 401, `headers ${JSON.stringify(headers)}: ${r.text}`);
      assertErrorShape(assert, r.json, { type: 'authentication_error', code: 'invalid_api_key' });
    }
    const models = await jfetch(server.url + '/v1/models', { method: 'GET' });
    assert.equal(models.status, 401);
    const sessions = await jfetch(server.url + '/v1/sessions', { method: 'GET' });
    assert.equal(sessions.status, 401);
  });

  it('the SDK sees 401 as AuthenticationError; both configured keys work', async () => {
    const bad = new OpenAI({ apiKey: 'nope', baseURL: server.baseURL, maxRetries: 0, timeout: 10000 });
    await assert.rejects(bad.chat.completions.create(chatBody(ONCE, { max_tokens: 2 })), (e) => {
      assert.ok(e instanceof OpenAI.AuthenticationError, String(e));
      assert.equal(e.status, 401);
      return true;
    });
    for (const key of [KEY, FILE_KEY]) {
      const r = await server.client(key).chat.completions.create(chatBody(ONCE, { max_tokens: 8 }));
      assert.ok(GOLDEN[ONCE].startsWith(r.choices[0].message.content), `key ${key}`);
    }
  });

  it('/health and /metrics stay open without a key', async () => {
    const h = await jfetch(server.url + '/health', { method: 'GET' });
    assert.equal(h.status, 200);
    const m = await jfetch(server.url + '/metrics', { method: 'GET' });
    assert.equal(m.status, 200);
  });

  /* ---- 404 ---- */

  it('404 for unknown routes', async () => {
    for (const [method, p] of [['GET', '/v1/nope'], ['POST', '/v1/chat/completion'], ['GET', '/'],
      ['POST', '/v2/chat/completions']]) {
      const r = await jfetch(server.url + p, { method, headers: auth, body: method === 'POST' ? {} : undefined });
      assert.equal(r.status, 404, `${method} ${p}: ${r.status} ${r.text}`);
      assertErrorShape(assert, r.json, { type: 'not_found_error' });
    }
    /* under /v1/models/ the rest is a model id (ids may hold '/'): OpenAI's model_not_found */
    const m = await jfetch(server.url + '/v1/models/extra/parts', { method: 'GET', headers: auth });
    assert.equal(m.status, 404, m.text);
    assertErrorShape(assert, m.json, { type: 'invalid_request_error', code: 'model_not_found' });
    const wrongMethod = await jfetch(server.url + '/v1/chat/completions', { method: 'GET', headers: auth });
    assert.ok([404, 405].includes(wrongMethod.status), `GET /v1/chat/completions: ${wrongMethod.status}`);
  });

  it('404 for an unknown session (body, header, sessions API)', async () => {
    const id = 'no-such-session-0000';
    let r = await chat(chatBody(ONCE, { max_tokens: 2, session_id: id }));
    assert.equal(r.status, 404, r.text);
    assertErrorShape(assert, r.json, { code: 'session_not_found' });
    r = await chat(chatBody(ONCE, { max_tokens: 2 }), { ...auth, 'x-session-id': id });
    assert.equal(r.status, 404, r.text);
    r = await post('/v1/completions', { prompt: ONCE, max_tokens: 2, session_id: id });
    assert.equal(r.status, 404, r.text);
    for (const [method, p] of [['GET', `/v1/sessions/${id}`], ['DELETE', `/v1/sessions/${id}`],
      ['POST', `/v1/sessions/${id}/save`], ['POST', `/v1/sessions/${id}/restore`]]) {
      const q = await jfetch(server.url + p, { method, headers: auth });
      assert.equal(q.status, 404, `${method} ${p}: ${q.status} ${q.text}`);
      assertErrorShape(assert, q.json);
    }
  });

  it('session ids that try path traversal are refused (400 or 404), never served', async () => {
    for (const id of ['..%2F..%2Fetc%2Fpasswd', '..', '%2E%2E', 'a%00b', 'x'.repeat(300)]) {
      const r = await jfetch(server.url + `/v1/sessions/${id}`, { method: 'GET', headers: auth });
      assert.ok([400, 404].includes(r.status), `GET /v1/sessions/${id.slice(0, 40)}: ${r.status}`);
    }
    for (const id of ['../../etc/passwd', 'a/b', 'x'.repeat(300), '', 'sp ace']) {
      const r = await chat(chatBody(ONCE, { max_tokens: 2, session_id: id }));
      assert.ok([400, 404].includes(r.status) || (id === '' && r.status === 200),
        `session_id ${JSON.stringify(id.slice(0, 40))}: ${r.status} ${r.text.slice(0, 200)}`);
    }
  });

  /* ---- 413 ---- */

  it('413 for a 10 MB body, with Content-Length and chunked', async () => {
    const big = Buffer.alloc(10 * 1024 * 1024, 0x20);
    big.write('{"messages":[{"role":"user","content":"', 0);
    big.write('"}]}', big.length - 4);
    for (const chunked of [false, true]) {
      const r = await rawChat(big, { chunked });
      assert.equal(r.status, 413, `chunked=${chunked}: ${r.status} ${r.text.slice(0, 200)}`);
      assertErrorShape(assert, r.json, { code: 'request_too_large' });
    }
    /* just under the limit is not a 413 (it is a normal request) */
    const ok = Buffer.from(JSON.stringify(chatBody(ONCE, { max_tokens: 2, pad: 'x'.repeat(MAX_BODY - 200) })));
    assert.ok(ok.length < MAX_BODY);
    const r = await rawChat(ok);
    assert.equal(r.status, 200, r.text.slice(0, 200));
  });

  /* ---- 400 ---- */

  it('400 for malformed JSON', async () => {
    for (const body of ['{"model":', '', 'not json', '{"messages":[{"role":"user","content":"hi"}]', "{'a':1}",
      '{"messages":[{"role":"user","content":"hi"}]} trailing']) {
      const r = await rawChat(Buffer.from(body));
      assert.equal(r.status, 400, `body ${JSON.stringify(body)}: ${r.status} ${r.text}`);
      assertErrorShape(assert, r.json, { type: 'invalid_request_error' });
    }
    for (const body of ['[]', '42', 'null', '"str"']) {
      const r = await rawChat(Buffer.from(body));
      assert.equal(r.status, 400, `body ${body}: ${r.status} ${r.text}`);
    }
  });

  it('400 for wrong types and values, naming the field', async () => {
    const cases = [
      [{ messages: 'hi' }, 'messages'],
      [{ messages: [] }, 'messages'],
      [{}, 'messages'],
      [{ messages: [{ role: 'user', content: 5 }] }, null],
      [{ messages: [{ role: 'tool', content: 'x' }] }, null],
      [{ messages: [{ role: 'user', content: ONCE }], temperature: 'hot' }, 'temperature'],
      [{ messages: [{ role: 'user', content: ONCE }], max_tokens: 'ten' }, 'max_tokens'],
      [{ messages: [{ role: 'user', content: ONCE }], max_tokens: -5 }, 'max_tokens'],
      [{ messages: [{ role: 'user', content: ONCE }], stream: 'yes' }, 'stream'],
      [{ messages: [{ role: 'user', content: ONCE }], stop: 5 }, 'stop'],
      [{ messages: [{ role: 'user', content: ONCE }], top_logprobs: 50, logprobs: true }, 'top_logprobs'],
      [{ messages: [{ role: 'user', content: ONCE }], n: 2 }, 'n'],
      [{ messages: [{ role: 'user', content: ONCE }], n: 'one' }, 'n'],
    ];
    for (const [body, param] of cases) {
      const r = await chat(body);
      assert.equal(r.status, 400, `${JSON.stringify(body)}: ${r.status} ${r.text}`);
      assertErrorShape(assert, r.json, { type: 'invalid_request_error' });
      if (param) assert.equal(r.json.error.param, param, `${JSON.stringify(body)}: ${r.text}`);
    }
    const sdk = server.client(KEY);
    await assert.rejects(sdk.chat.completions.create(chatBody(ONCE, { n: 2 })), (e) => {
      assert.ok(e instanceof OpenAI.BadRequestError, String(e));
      return true;
    });
  });

  it('400 context_length_exceeded: huge max_tokens, long prompt (chat and completions)', async () => {
    let r = await chat(chatBody(ONCE, { max_tokens: 100000 }));
    assert.equal(r.status, 400, r.text);
    assertErrorShape(assert, r.json, { code: 'context_length_exceeded' });
    /* near INT32_MAX: prompt + max_tokens must not wrap around (and past the check) */
    for (const max_tokens of [2147483647, 2147483647 - 3, 2147483647 - 250]) {
      r = await chat(chatBody(ONCE, { max_tokens }));
      assert.equal(r.status, 400, `chat max_tokens ${max_tokens}: ${r.text.slice(0, 300)}`);
      assertErrorShape(assert, r.json, { code: 'context_length_exceeded' });
      r = await post('/v1/completions', { prompt: [ONCE, ONCE], max_tokens });
      assert.equal(r.status, 400, `completions max_tokens ${max_tokens}: ${r.text.slice(0, 300)}`);
      assertErrorShape(assert, r.json, { code: 'context_length_exceeded' });
    }
    const long = 'Once upon a time there was a dog. '.repeat(60); /* ~600 tokens > -c 256 */
    r = await chat(chatBody(long, { max_tokens: 4 }));
    assert.equal(r.status, 400, r.text.slice(0, 300));
    assertErrorShape(assert, r.json, { code: 'context_length_exceeded', param: 'messages' });
    r = await post('/v1/completions', { prompt: long, max_tokens: 4 });
    assert.equal(r.status, 400, r.text.slice(0, 300));
    assertErrorShape(assert, r.json, { code: 'context_length_exceeded', param: 'prompt' });
    const stream = await chat(chatBody(long, { max_tokens: 4, stream: true }));
    assert.equal(stream.status, 400, 'a streaming request is refused before the stream starts');
  });

  it('the context boundary: prompt + max_tokens == n_ctx is fine, one more is 400', async () => {
    /* -c 256; "Once upon a time" is 5 prompt tokens (BOS included) */
    const fit = await chat(chatBody(ONCE, { max_tokens: 251 }));
    assert.equal(fit.status, 200, fit.text.slice(0, 300));
    assert.equal(fit.json.usage.prompt_tokens, 5);
    assert.equal(fit.json.usage.completion_tokens, 251);
    assert.equal(fit.json.choices[0].finish_reason, 'length');
    assert.ok(fit.json.choices[0].message.content.startsWith(GOLDEN[ONCE]));
    const over = await chat(chatBody(ONCE, { max_tokens: 252 }));
    assert.equal(over.status, 400, over.text.slice(0, 300));
    assertErrorShape(assert, over.json, { code: 'context_length_exceeded' });
  });

  it('without max_tokens, generation runs until the context is full (finish "length")', async () => {
    const r = await chat(chatBody(ONCE));
    assert.equal(r.status, 200, r.text.slice(0, 300));
    assert.equal(r.json.usage.completion_tokens, 256 - 5);
    assert.equal(r.json.choices[0].finish_reason, 'length');
    const s = await post('/v1/completions', { prompt: ONCE, temperature: 0, stream: true });
    assert.equal(s.status, 200);
    const text = s.text.split('\n').filter((l) => l.startsWith('data: {')).map((l) => JSON.parse(l.slice(6)))
      .map((e) => e.choices[0]?.text ?? '').join('');
    assert.equal(text, r.json.choices[0].message.content, 'streamed completion = non-streamed chat (plain template)');
  });

  it('400 for invalid UTF-8 and NUL in strings (raw bytes)', async () => {
    const head = Buffer.from('{"messages":[{"role":"user","content":"Once ');
    const tail = Buffer.from('"}],"max_tokens":2}');
    for (const bad of [[0xff, 0xfe], [0xc3], [0xc0, 0xaf], [0xed, 0xa0, 0x80], [0xf4, 0x90, 0x80, 0x80], [0x80]]) {
      const r = await rawChat(Buffer.concat([head, Buffer.from(bad), tail]));
      assert.equal(r.status, 400, `bytes ${Buffer.from(bad).toString('hex')}: ${r.status} ${r.text}`);
      assertErrorShape(assert, r.json);
    }
    const nul = await rawChat(Buffer.from('{"messages":[{"role":"user","content":"a\\u0000b"}],"max_tokens":2}'));
    assert.equal(nul.status, 400, nul.text);
    /* valid multi-byte text is fine */
    const ok = await rawChat(Buffer.concat([head, Buffer.from('café 日本 😀'), tail]));
    assert.equal(ok.status, 200, ok.text);
  });

  it('400 for 100k-deep nesting', async () => {
    for (const body of ['['.repeat(100000), '['.repeat(100000) + ']'.repeat(100000),
      '{"messages":' + '{"a":'.repeat(100000) + '1' + '}'.repeat(100000) + '}']) {
      const r = await rawChat(Buffer.from(body));
      assert.equal(r.status, 400, `${body.slice(0, 20)}...: ${r.status} ${r.text.slice(0, 200)}`);
      assertErrorShape(assert, r.json);
    }
  });

  /* ---- the request line and framing ---- */

  it('400 and a closed connection for Content-Length together with Transfer-Encoding (no smuggling)', async () => {
    const port = Number(new URL(server.url).port);
    const body = JSON.stringify(chatBody(ONCE, { max_tokens: 2 }));
    const chunked = `${Buffer.byteLength(body).toString(16)}\r\n${body}\r\n0\r\n\r\n`;
    const smuggled = `GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEY}\r\n\r\n`;
    const req = `POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEY}\r\n` +
      `Content-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n` +
      `Transfer-Encoding: chunked\r\n\r\n${chunked}${smuggled}`;
    const r = await rawExchange(port, req);
    assert.match(r.text, /^HTTP\/1\.1 400 /, r.text.slice(0, 200));
    assertErrorShape(assert, JSON.parse(firstBody(r.text)), { type: 'invalid_request_error' });
    assert.equal(r.text.match(/HTTP\/1\.1 \d{3}/g).length, 1, `more than one response: ${r.text}`);
    assert.ok(r.closed, 'the connection stayed open after an ambiguous request');
  });

  it('an absolute-URI request line routes like its path', async () => {
    const port = Number(new URL(server.url).port);
    const body = JSON.stringify(chatBody(ONCE, { max_tokens: 64 }));
    const r = await rawExchange(port, `POST http://127.0.0.1:${port}/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\n` +
      `Authorization: Bearer ${KEY}\r\nContent-Type: application/json\r\nConnection: close\r\n` +
      `Content-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`);
    assert.match(r.text, /^HTTP\/1\.1 200 /, r.text.slice(0, 300));
    assert.equal(JSON.parse(firstBody(r.text)).choices[0].message.content, GOLDEN[ONCE]);
    const h = await rawExchange(port, `GET HTTP://localhost:${port}/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`);
    assert.match(h.text, /^HTTP\/1\.1 200 /, h.text.slice(0, 300));
    assert.deepEqual(JSON.parse(firstBody(h.text)), { status: 'ok' });
  });

  it('the server still answers correctly after all of the above', async () => {
    assert.equal(server.exited(), null, 'server died');
    const r = await server.client(KEY).chat.completions.create(chatBody(ONCE, { max_tokens: 64 }));
    assert.equal(r.choices[0].message.content, GOLDEN[ONCE]);
  });
});

/* --host with IPv6: ::1 alone, and :: for both families. */
describe('IPv6 listening', { timeout: 60000 }, () => {
  const has6 = () => new Promise((resolve) => {
    const srv = net.createServer();
    srv.once('error', () => resolve(false));
    srv.listen(0, '::1', () => srv.close(() => resolve(true)));
  });

  async function serveOn(host) {
    const port = await freePort();
    const dir = tmpDir('ipv6');
    const proc = spawn(BIN, ['serve', '-m', MODEL, '--host', host, '--port', String(port), '--session-dir', dir],
      { stdio: ['ignore', 'ignore', 'pipe'] });
    let log = '';
    proc.stderr.on('data', (d) => { log += d; });
    const exited = new Promise((res) => proc.once('exit', (code) => res(code)));
    const stop = async () => { proc.kill('SIGTERM'); await exited; fs.rmSync(dir, { recursive: true, force: true }); };
    for (let i = 0; i < 200; i++) {
      if (proc.exitCode !== null) break;
      try {
        const r = await fetch(`http://[::1]:${port}/health`, { signal: AbortSignal.timeout(2000) });
        if (r.status === 200) return { port, stop, log: () => log };
      } catch { /* not yet */ }
      await sleep(50);
    }
    await stop();
    throw new Error(`kvpark serve --host ${host} did not answer on [::1]:${port}:\n${log}`);
  }

  it('--host ::1 and --host :: serve over IPv6 (and :: over IPv4 too)', async (t) => {
    if (!(await has6())) { t.skip('this machine has no IPv6 loopback (::1)'); return; }
    const one = await serveOn('::1');
    try {
      const r = await jfetch(`http://[::1]:${one.port}/v1/chat/completions`, { body: chatBody(ONCE, { max_tokens: 64 }) });
      assert.equal(r.status, 200, r.text);
      assert.equal(r.json.choices[0].message.content, GOLDEN[ONCE]);
      assert.match(one.log(), /listening on http:\/\/\[::1\]:/);
    } finally { await one.stop(); }
    const both = await serveOn('::');
    try {
      for (const base of [`http://[::1]:${both.port}`, `http://127.0.0.1:${both.port}`]) {
        const r = await jfetch(base + '/health', { method: 'GET' });
        assert.equal(r.status, 200, `${base}: ${r.text}`);
      }
    } finally { await both.stop(); }
  });
});
