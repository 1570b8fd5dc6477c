/*
 * queue.test.mjs — back-pressure: with --parallel 1 --queue 1 the server runs
 * one request, holds one more, and answers the rest 429 at once (streaming
 * ones too, before any stream starts); afterwards it serves normally again.
 *
 * Why: a server that queues without bound hides overload until clients time
 * out; kvpark promises a fast, explicit 429 instead.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import OpenAI from 'openai';
import { GOLDEN, ONCE, assertErrorShape, chatBody, jfetch, startServer } from './helpers.mjs';

describe('queue limit', { timeout: 90000 }, () => {
  let server;
  before(async () => {
    server = await startServer({ args: ['--parallel', '1', '--queue', '1', '-c', '2048'] });
  });
  after(async () => { if (server) await server.stop(); });

  it('429 queue_full beyond --parallel + --queue, then service resumes', async () => {
    /* long greedy requests (no EOS in the first 2000 greedy tokens of this prompt) */
    const N = 8;
    const t0 = Date.now();
    const reqs = Array.from({ length: N }, (_, i) => jfetch(server.baseURL + '/chat/completions', {
      body: chatBody(ONCE, { max_tokens: 2000, ignore_eos: true, stream: i % 2 === 1 }), timeoutMs: 60000,
    }).then((r) => ({ ...r, ms: Date.now() - t0, stream: i % 2 === 1 })));
    const res = await Promise.all(reqs);
    const statuses = res.map((r) => r.status);
    const ok = res.filter((r) => r.status === 200);
    const busy = res.filter((r) => r.status === 429);
    assert.equal(ok.length + busy.length, N, `unexpected statuses ${statuses}`);
    /* one running + one waiting; a third would mean the queue bound leaks under a burst */
    assert.ok(ok.length >= 1 && ok.length <= 2, `${ok.length} accepted of ${N} with --parallel 1 --queue 1 (statuses ${statuses})`);
    for (const r of busy) {
      assertErrorShape(assert, r.json, { type: 'rate_limit_error', code: 'queue_full' });
      /* refusals are immediate, not after waiting for the running request */
      assert.ok(r.ms < Math.max(...ok.map((o) => o.ms)), `a 429 took ${r.ms} ms`);
    }
    for (const r of ok) {
      const text = r.stream
        ? r.text.split('\n').filter((l) => l.startsWith('data: {')).map((l) => JSON.parse(l.slice(6)))
          .map((e) => e.choices[0]?.delta?.content ?? '').join('')
        : r.json.choices[0].message.content;
      assert.ok(text.startsWith(GOLDEN[ONCE]), 'accepted requests still produce the greedy text');
    }
  });

  it('the SDK sees a 429 as RateLimitError', async () => {
    const sdk = server.client();
    await sdk.models.list(); /* warm the SDK up so that the burst really is one */
    const long = Array.from({ length: 8 }, () => sdk.chat.completions.create(chatBody(ONCE, { max_tokens: 2000, ignore_eos: true }))
      .then(() => null, (e) => e));
    const errs = (await Promise.all(long)).filter(Boolean);
    assert.ok(errs.length >= 6, `only ${errs.length} of 8 refused with --parallel 1 --queue 1`);
    for (const e of errs) assert.ok(e instanceof OpenAI.RateLimitError, String(e));
  });

  it('a client that disconnects frees its slot at once (the request is cancelled)', async () => {
    /* how long a full 1000-token request holds the only slot */
    let t0 = Date.now();
    const full = await jfetch(server.baseURL + '/chat/completions', { body: chatBody(ONCE, { max_tokens: 1000, ignore_eos: true }) });
    const fullMs = Date.now() - t0;
    assert.equal(full.status, 200);
    assert.equal(full.json.usage.completion_tokens, 1000);

    const ac = new AbortController();
    const r = await fetch(server.baseURL + '/chat/completions', {
      method: 'POST', signal: ac.signal, headers: { 'content-type': 'application/json' },
      body: JSON.stringify(chatBody(ONCE, { max_tokens: 1000, ignore_eos: true, stream: true })),
    });
    assert.equal(r.status, 200);
    const reader = r.body.getReader();
    let seen = '';
    while (!seen.includes('"content":",')) { /* wait for real content, then hang up */
      const { value, done } = await reader.read();
      if (done) break;
      seen += Buffer.from(value).toString();
    }
    ac.abort();
    t0 = Date.now();
    const next = await jfetch(server.baseURL + '/chat/completions', { body: chatBody(ONCE, { max_tokens: 4 }) });
    const nextMs = Date.now() - t0;
    assert.equal(next.status, 200, next.text);
    assert.ok(nextMs < fullMs / 2, `the next request took ${nextMs} ms; a full request takes ${fullMs} ms: ` +
      'the abandoned stream kept the slot');
  });

  it('after the burst the server answers normally', async () => {
    const r = await jfetch(server.baseURL + '/chat/completions', { body: chatBody(ONCE, { max_tokens: 64 }) });
    assert.equal(r.status, 200, r.text);
    assert.equal(r.json.choices[0].message.content, GOLDEN[ONCE]);
  });
});
