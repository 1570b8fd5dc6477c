/*
 * concurrency.test.mjs — many clients at once: 16 concurrent streaming SDK
 * clients must each get exactly the greedy text a lone client gets (batching
 * must not mix sequences up), and a client that disconnects mid-stream must
 * not disturb the others or wedge the server.
 *
 * Why: continuous batching shares one model between requests; the classic
 * bugs are crossed streams, one sequence's KV leaking into another, and a
 * dead socket that blocks the scheduler or crashes the writer.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { GOLDEN, GOLDEN_N, ONCE, collectStream, jfetch, sleep, startServer } from './helpers.mjs';

const PROMPTS = Object.keys(GOLDEN);

describe('concurrency', { timeout: 90000 }, () => {
  let server;
  let client;
  const single = {};
  const stream = (prompt, extra = {}, opts = {}) => client.chat.completions.create({
    model: 'm', messages: [{ role: 'user', content: prompt }], temperature: 0, max_tokens: GOLDEN_N,
    stream: true, ...extra,
  }, opts);

  before(async () => {
    server = await startServer({ args: ['--parallel', '16'] });
    client = server.client();
  });
  after(async () => { if (server) await server.stop(); });

  it('a single client gets the golden text for each prompt', async () => {
    for (const p of PROMPTS) {
      const s = await collectStream(await stream(p));
      single[p] = s.text;
      assert.equal(s.text, GOLDEN[p], `prompt ${JSON.stringify(p)}`);
      assert.equal(s.finish, 'length');
    }
  });

  it('16 concurrent streaming clients each get the single-client text', async () => {
    const jobs = Array.from({ length: 16 }, (_, i) => PROMPTS[i % PROMPTS.length]);
    const t0 = Date.now();
    const res = await Promise.all(jobs.map(async (p) => ({ p, s: await collectStream(await stream(p)) })));
    const ms = Date.now() - t0;
    for (const [i, { p, s }] of res.entries()) {
      assert.equal(s.text, single[p] ?? GOLDEN[p], `client ${i}, prompt ${JSON.stringify(p)}`);
      assert.equal(s.finish, 'length', `client ${i}`);
    }
    const ids = new Set(res.map(({ s }) => s.chunks[0].id));
    assert.equal(ids.size, 16, 'every response has its own id');
    console.log(`# 16 streams x ${GOLDEN_N} tokens in ${ms} ms`);
  });

  it('mixed streaming and non-streaming, different lengths, at once', async () => {
    const jobs = PROMPTS.flatMap((p, i) => [
      stream(p, { max_tokens: 8 + 8 * i }).then(collectStream).then((s) => [p, s.text, 8 + 8 * i]),
      client.chat.completions.create({ model: 'm', messages: [{ role: 'user', content: p }], temperature: 0, max_tokens: 40 })
        .then((r) => [p, r.choices[0].message.content, 40]),
    ]);
    for (const [p, text] of await Promise.all(jobs)) {
      assert.ok(text.length > 0 && GOLDEN[p].startsWith(text), `prompt ${JSON.stringify(p)}: ${JSON.stringify(text)}`);
    }
  });

  it('a client that aborts mid-stream does not disturb the others', async () => {
    const ac = new AbortController();
    const victim = (async () => {
      const s = await stream(ONCE, { max_tokens: 400 }, { signal: ac.signal });
      let got = 0;
      try {
        for await (const ch of s) {
          if (ch.choices[0]?.delta?.content) got++;
          if (got === 3) ac.abort();
        }
      } catch (e) {
        if (!ac.signal.aborted) throw e;
      }
      return got;
    })();
    const others = PROMPTS.map((p) => stream(p).then(collectStream));
    const got = await victim;
    assert.ok(got >= 3, 'the victim received some content before aborting');
    const res = await Promise.all(others);
    res.forEach((s, i) => assert.equal(s.text, GOLDEN[PROMPTS[i]], `bystander ${i}`));

    /* also drop raw connections right after sending a request, before any reply */
    for (let i = 0; i < 4; i++) {
      const c = new AbortController();
      const p = fetch(server.baseURL + '/chat/completions', {
        method: 'POST', signal: c.signal, headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ messages: [{ role: 'user', content: ONCE }], max_tokens: 300, stream: i % 2 === 0 }),
      }).catch(() => null);
      await sleep(5);
      c.abort();
      await p;
    }

    await sleep(100);
    assert.equal(server.exited(), null, `server died: ${server.log().slice(-1000)}`);
    const h = await jfetch(server.url + '/health', { method: 'GET' });
    assert.equal(h.status, 200);
    const after = await collectStream(await stream(ONCE));
    assert.equal(after.text, GOLDEN[ONCE]);
  });
});

describe('concurrency beyond --parallel', { timeout: 60000 }, () => {
  let server;
  before(async () => { server = await startServer({ args: ['--parallel', '4', '--queue', '64'] }); });
  after(async () => { if (server) await server.stop(); });

  it('16 streaming clients on 4 slots: 12 wait their turn, all get the golden text', async () => {
    const client = server.client();
    const jobs = Array.from({ length: 16 }, (_, i) => PROMPTS[i % PROMPTS.length]);
    const res = await Promise.all(jobs.map(async (p) => ({
      p,
      s: await collectStream(await client.chat.completions.create({
        model: 'm', messages: [{ role: 'user', content: p }], temperature: 0, max_tokens: GOLDEN_N, stream: true,
      })),
    })));
    for (const [i, { p, s }] of res.entries()) assert.equal(s.text, GOLDEN[p], `client ${i}`);
  });
});
