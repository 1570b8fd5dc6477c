/*
 * longbody.test.mjs — a response is whole and honest however long it takes
 * and however the client closes its side:
 *
 *   1. With `--timeout 1`, non-streaming requests of 2,000 tokens (several at
 *      once) come back complete: status 200, 2,000 tokens, the same text as a
 *      streamed run of the same greedy request; a stream that waits in the
 *      queue for seconds meanwhile is not cut either. (Before: the status
 *      line went out before generation and the idle timer could cut the
 *      body.)
 *   2. A non-streaming request whose generation fails (here: the server is
 *      stopped under it) answers its real status with an OpenAI error body,
 *      not a 200 with an error inside.
 *   3. A client that sends its request and then half-closes (shutdown
 *      SHUT_WR, as tools and proxies do) still reads the full, correct
 *      response, streaming and not. (Before: the half-close was taken for a
 *      hang-up and the generation cancelled.)
 *   4. Usage is exact every time: 200 short streamed requests in a row with
 *      stream_options.include_usage, and batched (multi-prompt) requests,
 *      streamed and not. (Before: a race between sched_submit returning and
 *      the job ending reported 0 tokens now and then.)
 *
 * Why: an API client cannot tell a cut-off body or a zero usage from a real
 * one; the server must never send either.
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import { after, before, describe, it } from 'node:test';
import {
  GOLDEN, GOLDEN_PROMPT_TOKENS, ONCE, assertErrorShape, jfetch, sleep, sse, startServer,
} from './helpers.mjs';

const LONG = { prompt: ONCE, max_tokens: 2000, ignore_eos: true, temperature: 0 };
const OTHER = 'The little dog was sad because';

/* Send raw bytes on a fresh socket, half-close, read until the server closes. */
function halfClosed(port, bytes, timeoutMs = 60000) {
  return new Promise((resolve, reject) => {
    const sock = net.connect(port, '127.0.0.1');
    const parts = [];
    const timer = setTimeout(() => { sock.destroy(); reject(new Error(`no end of response in ${timeoutMs} ms`)); }, timeoutMs);
    sock.on('connect', () => { sock.write(bytes); sock.end(); /* FIN: our side is done */ });
    sock.on('data', (d) => parts.push(d));
    sock.on('error', (e) => { clearTimeout(timer); reject(e); });
    sock.on('close', () => { clearTimeout(timer); resolve(Buffer.concat(parts).toString('utf8')); });
  });
}

/* Split a raw HTTP/1.1 response into status and (de-chunked) body. */
function parseHttp(raw) {
  const sep = raw.indexOf('\r\n\r\n');
  assert.ok(sep > 0, `no header end in ${JSON.stringify(raw.slice(0, 200))}`);
  const head = raw.slice(0, sep);
  let body = raw.slice(sep + 4);
  const status = Number(head.split(' ')[1]);
  if (/transfer-encoding:\s*chunked/i.test(head)) {
    let out = '';
    let rest = body;
    for (;;) {
      const nl = rest.indexOf('\r\n');
      if (nl < 0) break;
      const n = parseInt(rest.slice(0, nl), 16);
      if (!n) break;
      out += rest.slice(nl + 2, nl + 2 + n); /* ASCII bodies here: chars = bytes */
      rest = rest.slice(nl + 2 + n + 2);
    }
    body = out;
  }
  return { status, head, body };
}

const sseText = (body) => body.split('\n').filter((l) => l.startsWith('data: {'))
  .map((l) => JSON.parse(l.slice(6))).map((e) => e.choices[0]?.text ?? '').join('');

describe('long, half-closed and counted responses', { timeout: 170000 }, () => {
  let server;
  before(async () => {
    server = await startServer({ args: ['--timeout', '1', '--parallel', '4', '-c', '2048'] });
  });
  after(async () => { if (server) await server.stop(); });

  it('--timeout 1: 2000-token non-streaming answers are complete and equal the streamed text; a queued stream too', async () => {
    /* Every request on a fresh connection (connection: close): with --timeout 1 a pooled keep-alive
     * connection can be closed by the server's idle timer just as the client reuses it, which fails
     * the fetch before it is sent (a client-side race, not a cut response). */
    const CLOSE = { connection: 'close' };
    const ref = await sse(server.baseURL + '/completions', { ...LONG, stream: true }, { timeoutMs: 120000, headers: CLOSE });
    assert.equal(ref.status, 200);
    assert.ok(ref.done, 'the reference stream ended without [DONE]');
    const refText = ref.events.map((e) => e.choices[0]?.text ?? '').join('');
    assert.ok(refText.length > 2000, `reference text only ${refText.length} chars`);
    const longs = Array.from({ length: 3 }, () =>
      jfetch(server.baseURL + '/completions', { body: LONG, timeoutMs: 120000, headers: CLOSE }));
    await sleep(300); /* the three hold 3 of the 4 slots: of two streams, one waits for seconds */
    const streams = Array.from({ length: 2 }, () => sse(server.baseURL + '/completions',
      { prompt: ONCE, max_tokens: 64, temperature: 0, stream: true }, { timeoutMs: 120000, headers: CLOSE }));
    for (const st of await Promise.all(streams)) {
      assert.equal(st.status, 200);
      assert.ok(st.done, 'a stream that waited in the queue was cut before [DONE]');
      assert.equal(st.events.map((e) => e.choices[0]?.text ?? '').join(''), GOLDEN[ONCE]);
    }
    const res = await Promise.all(longs);
    for (const r of res) {
      assert.equal(r.status, 200, r.text.slice(0, 300));
      assert.ok(r.json, `body is not JSON (${r.text.length} bytes): ${r.text.slice(-200)}`);
      assert.equal(r.json.usage.completion_tokens, 2000);
      assert.equal(r.json.choices[0].finish_reason, 'length');
      assert.equal(r.json.choices[0].text, refText);
    }
  });

  it('half-closed after the request: the full answer still comes (non-streaming and streaming)', async () => {
    const body = JSON.stringify({ prompt: ONCE, max_tokens: 64, temperature: 0 });
    const req = (b) => `POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n` +
      `Content-Length: ${Buffer.byteLength(b)}\r\n\r\n${b}`;
    const raw0 = await halfClosed(server.port, req(body));
    const plain = parseHttp(raw0);
    assert.equal(plain.status, 200, plain.body.slice(0, 300));
    assert.equal(JSON.parse(plain.body).choices[0].text, GOLDEN[ONCE]);
    const streamed = parseHttp(await halfClosed(server.port, req(JSON.stringify({ prompt: ONCE, max_tokens: 64, temperature: 0, stream: true }))));
    assert.equal(streamed.status, 200);
    assert.ok(streamed.body.includes('data: [DONE]'), `no [DONE]: ${streamed.body.slice(-300)}`);
    assert.equal(sseText(streamed.body), GOLDEN[ONCE]);
  });

  it('streamed usage is exact, 200 times in a row', async () => {
    const bad = [];
    for (let i = 0; i < 200; i++) {
      const n = 1 + (i % 3);
      const r = await sse(server.baseURL + '/completions', {
        prompt: ONCE, max_tokens: n, temperature: 0, stream: true, stream_options: { include_usage: true },
      });
      const u = r.events.at(-1)?.usage;
      if (r.status !== 200 || !u || u.prompt_tokens !== GOLDEN_PROMPT_TOKENS[ONCE] || u.completion_tokens !== n)
        bad.push(`#${i}: status ${r.status} usage ${JSON.stringify(u)}`);
    }
    assert.deepEqual(bad, [], `wrong usage in ${bad.length} of 200 requests`);
  });

  it('batched (multi-prompt) usage is exact, streamed and not', async () => {
    const want = { prompt_tokens: GOLDEN_PROMPT_TOKENS[ONCE] + GOLDEN_PROMPT_TOKENS[OTHER], completion_tokens: 2 };
    for (let i = 0; i < 50; i++) {
      const body = { prompt: [ONCE, OTHER], max_tokens: 1, temperature: 0 };
      const r = await jfetch(server.baseURL + '/completions', { body });
      assert.equal(r.status, 200, r.text);
      assert.equal(r.json.usage.prompt_tokens, want.prompt_tokens, JSON.stringify(r.json.usage));
      assert.equal(r.json.usage.completion_tokens, want.completion_tokens, JSON.stringify(r.json.usage));
      const s = await sse(server.baseURL + '/completions', { ...body, stream: true, stream_options: { include_usage: true } });
      const u = s.events.at(-1)?.usage;
      assert.ok(u, 'no usage chunk');
      assert.equal(u.prompt_tokens, want.prompt_tokens, JSON.stringify(u));
      assert.equal(u.completion_tokens, want.completion_tokens, JSON.stringify(u));
    }
  });
});

describe('a generation that fails answers its real status', { timeout: 90000 }, () => {
  it('stopped under non-streaming requests: 503 with an OpenAI error body, never a cut 200', async () => {
    /* 12 requests of 2000 tokens on one sequence: ~24,000 tokens, seconds of work even
     * for this small model on a fast machine, so some are generating or queued when the
     * server stops; whatever finished before is a complete 200 */
    const server = await startServer({ args: ['--parallel', '1', '-c', '2048'] });
    try {
      const pending = Array.from({ length: 12 }, () =>
        jfetch(server.baseURL + '/completions', { body: LONG, timeoutMs: 60000 }).catch((e) => ({ status: 0, text: String(e) })));
      await sleep(300);
      const stopped = server.stop();
      const rs = await Promise.all(pending);
      await stopped;
      let refused = 0;
      for (const r of rs) {
        if (r.status === 200) {
          assert.equal(r.json.usage.completion_tokens, 2000, 'a 200 is a whole answer');
          continue;
        }
        assert.equal(r.status, 503, `${r.status} ${String(r.text).slice(0, 300)}`);
        assertErrorShape(assert, r.json);
        refused++;
      }
      assert.ok(refused > 0, `every one of 12 long requests finished before the stop: ${rs.map((r) => r.status)}`);
    } finally {
      await server.stop();
    }
  });
});
