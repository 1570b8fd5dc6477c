/*
 * chat.test.mjs — the generation endpoints of `kvpark serve`, driven by the
 * official OpenAI Node SDK: chat and legacy completions, streaming and not,
 * greedy output against llama.cpp's golden text, max_tokens, stop sequences
 * (including ones that span or split tokens), seeded sampling, logprobs,
 * usage and prefix-cache accounting, /v1/models.
 *
 * Why: these are the behaviours every OpenAI client relies on; the unit tests
 * check the pieces, this checks the assembled server speaks the protocol.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import {
  GOLDEN, GOLDEN_N, GOLDEN_PROMPT_TOKENS, ONCE, SHARED, collectStream, jfetch, sse, startServer,
} from './helpers.mjs';

const GOLD = GOLDEN[ONCE]; /* ", there was a little girl named Lily. She loved ..." */

describe('chat and completions', { timeout: 90000 }, () => {
  let server;
  let client;

  before(async () => {
    server = await startServer({ args: ['-c', '512'] });
    client = server.client();
  });
  after(async () => { if (server) await server.stop(); });

  it('GET /v1/models lists one model', async () => {
    const page = await client.models.list();
    assert.equal(page.data.length, 1);
    const m = page.data[0];
    assert.equal(typeof m.id, 'string');
    assert.ok(m.id.length > 0);
    assert.equal(m.object, 'model');
    assert.equal(typeof m.created, 'number');
    /* GET /v1/models/{id}: the same object; another id is a 404 naming it */
    const one = await client.models.retrieve(m.id);
    assert.deepEqual(one, m);
    await assert.rejects(client.models.retrieve('gpt-4o'), (e) => {
      assert.equal(e.status, 404);
      assert.equal(e.code, 'model_not_found');
      assert.match(e.message, /gpt-4o/);
      return true;
    });
  });

  it('GET /health is {"status":"ok"}', async () => {
    const r = await jfetch(server.url + '/health', { method: 'GET' });
    assert.equal(r.status, 200);
    assert.deepEqual(r.json, { status: 'ok' });
  });

  it('non-streaming chat at temperature 0 equals the golden greedy text', async () => {
    const r = await client.chat.completions.create({
      model: 'stories260K', messages: [{ role: 'user', content: ONCE }],
      temperature: 0, max_tokens: GOLDEN_N,
    });
    assert.equal(r.object, 'chat.completion');
    assert.match(r.id, /^chatcmpl-/);
    assert.equal(typeof r.created, 'number');
    assert.equal(r.choices.length, 1);
    const c = r.choices[0];
    assert.equal(c.index, 0);
    assert.equal(c.message.role, 'assistant');
    assert.equal(c.message.content, GOLD);
    assert.equal(c.finish_reason, 'length');
    assert.equal(r.usage.prompt_tokens, GOLDEN_PROMPT_TOKENS[ONCE]);
    assert.equal(r.usage.completion_tokens, GOLDEN_N);
    assert.equal(r.usage.total_tokens, GOLDEN_PROMPT_TOKENS[ONCE] + GOLDEN_N);
  });

  it('text content parts are accepted like a plain string', async () => {
    const r = await client.chat.completions.create({
      model: 'stories260K', temperature: 0, max_tokens: 16,
      messages: [{ role: 'user', content: [{ type: 'text', text: ONCE }] }],
    });
    assert.ok(GOLD.startsWith(r.choices[0].message.content), r.choices[0].message.content);
    assert.equal(r.usage.completion_tokens, 16);
  });

  it('all four golden prompts reproduce llama.cpp greedily', async () => {
    for (const [prompt, text] of Object.entries(GOLDEN)) {
      const r = await client.chat.completions.create({
        model: 'm', messages: [{ role: 'user', content: prompt }], temperature: 0, max_tokens: GOLDEN_N,
      });
      assert.equal(r.choices[0].message.content, text, `prompt ${JSON.stringify(prompt)}`);
    }
  });

  it('streaming chat (SDK): role first, deltas join to the golden text, usage last', async () => {
    const stream = await client.chat.completions.create({
      model: 'stories260K', messages: [{ role: 'user', content: ONCE }],
      temperature: 0, max_tokens: GOLDEN_N, stream: true, stream_options: { include_usage: true },
    });
    const got = await collectStream(stream);
    assert.equal(got.role, 'assistant');
    assert.equal(got.text, GOLD);
    assert.equal(got.finish, 'length');
    assert.ok(got.chunks.length > 3, `only ${got.chunks.length} chunks: not streamed`);
    for (const ch of got.chunks) {
      assert.equal(ch.object, 'chat.completion.chunk');
      assert.equal(ch.id, got.chunks[0].id, 'all chunks share one id');
    }
    const last = got.chunks.at(-1);
    assert.deepEqual(last.choices, [], 'the usage chunk has no choices');
    assert.equal(last.usage.prompt_tokens, GOLDEN_PROMPT_TOKENS[ONCE]);
    assert.equal(last.usage.completion_tokens, GOLDEN_N);
    for (const ch of got.chunks.slice(0, -1)) assert.equal(ch.usage ?? null, null);
  });

  it('raw SSE: text/event-stream, data: lines, ends with [DONE]', async () => {
    const r = await sse(server.baseURL + '/chat/completions',
      { model: 'm', messages: [{ role: 'user', content: ONCE }], temperature: 0, max_tokens: 8, stream: true });
    assert.equal(r.status, 200);
    assert.match(r.headers.get('content-type') || '', /^text\/event-stream/);
    assert.ok(r.done, 'no data: [DONE]');
    assert.ok(r.raw.trimEnd().endsWith('data: [DONE]'));
    const text = r.events.map((e) => e.choices[0]?.delta?.content ?? '').join('');
    assert.ok(GOLD.startsWith(text) && text.length > 0);
    assert.equal(r.events.at(-1).choices[0].finish_reason, 'length');
  });

  it('max_tokens and max_completion_tokens stop with finish_reason "length"', async () => {
    for (const field of ['max_tokens', 'max_completion_tokens']) {
      const r = await client.chat.completions.create({
        model: 'm', messages: [{ role: 'user', content: ONCE }], temperature: 0, [field]: 5,
      });
      assert.equal(r.choices[0].finish_reason, 'length', field);
      assert.equal(r.usage.completion_tokens, 5, field);
      assert.ok(GOLD.startsWith(r.choices[0].message.content), field);
      assert.ok(r.choices[0].message.content.length > 0, field);
    }
  });

  /* stop strings: where the golden text must be cut, and why the case is hard */
  const stopCases = [
    { stop: 'little girl', why: 'spans two tokens' },
    { stop: 'ttle gi', why: 'starts and ends inside tokens' },
    { stop: ['Lily', 'park'], why: 'array: the earliest match wins' },
    { stop: ['zzz', 'red ball'], why: 'array: first entry never matches' },
    { stop: ',', why: 'matches the very first character' },
    { stop: '\nLily', why: 'contains a newline' },
  ];
  const cutAt = (stop) => {
    const list = Array.isArray(stop) ? stop : [stop];
    const idx = Math.min(...list.map((s) => GOLD.indexOf(s)).filter((i) => i >= 0));
    return GOLD.slice(0, idx);
  };

  for (const { stop, why } of stopCases) {
    it(`stop ${JSON.stringify(stop)} (${why}): non-streaming and streaming end right before it`, async () => {
      const want = cutAt(stop);
      const body = { model: 'm', messages: [{ role: 'user', content: ONCE }], temperature: 0, max_tokens: GOLDEN_N, stop };
      const r = await client.chat.completions.create(body);
      assert.equal(r.choices[0].message.content, want);
      assert.equal(r.choices[0].finish_reason, 'stop');

      const s = await collectStream(await client.chat.completions.create({ ...body, stream: true }));
      assert.equal(s.text, want, 'streamed text (stop text must never be sent, even partially)');
      assert.equal(s.finish, 'stop');
    });
  }

  it('a stop string that never occurs changes nothing', async () => {
    const r = await client.chat.completions.create({
      model: 'm', messages: [{ role: 'user', content: ONCE }], temperature: 0, max_tokens: GOLDEN_N, stop: ['dragon'],
    });
    assert.equal(r.choices[0].message.content, GOLD);
    assert.equal(r.choices[0].finish_reason, 'length');
  });

  it('seeded sampling is deterministic; another seed gives another text', async () => {
    const body = { model: 'm', messages: [{ role: 'user', content: ONCE }], temperature: 0.8, max_tokens: 48 };
    const a = await client.chat.completions.create({ ...body, seed: 1234 });
    const b = await client.chat.completions.create({ ...body, seed: 1234 });
    assert.equal(a.choices[0].message.content, b.choices[0].message.content);
    const s = await collectStream(await client.chat.completions.create({ ...body, seed: 1234, stream: true }));
    assert.equal(s.text, a.choices[0].message.content, 'streaming with the same seed gives the same text');
    const texts = new Set([a.choices[0].message.content]);
    for (const seed of [1, 2, 3]) {
      texts.add((await client.chat.completions.create({ ...body, seed })).choices[0].message.content);
    }
    assert.ok(texts.size >= 3, `4 seeds gave only ${texts.size} distinct texts`);
  });

  it('sampling options (top_p, penalties, user) are accepted', async () => {
    const r = await client.chat.completions.create({
      model: 'm', messages: [{ role: 'user', content: ONCE }], max_tokens: 16, temperature: 0.7, top_p: 0.9,
      presence_penalty: 0.5, frequency_penalty: 0.5, seed: 7, user: 'integration-test', n: 1,
    });
    assert.equal(r.usage.completion_tokens > 0, true);
    assert.equal(typeof r.choices[0].message.content, 'string');
  });

  it('logit_bias: -100 bans the greedy token, +100 forces one, 0 changes nothing; bad ids are 400', async () => {
    /* the golden greedy ids of ONCE (llama.cpp's), the first GOLDEN_N generated tokens */
    const gold = JSON.parse(fs.readFileSync(path.join(SHARED, 'golden', 'stories260K', 'logits.json'), 'utf8'))
      .cases.find((c) => c.prompt === ONCE).greedy.ids;
    const ask = (logit_bias, n = 6) => client.chat.completions.create({
      model: 'm', messages: [{ role: 'user', content: ONCE }], temperature: 0, max_tokens: n,
      logprobs: true, logit_bias,
    });
    const plain = await ask(undefined);
    assert.equal(plain.choices[0].message.content, GOLD.slice(0, plain.choices[0].message.content.length));
    const first = plain.choices[0].logprobs.content[0].token;
    const banned = await ask({ [gold[0]]: -100 });
    assert.notEqual(banned.choices[0].logprobs.content[0].token, first, 'the banned token was generated');
    const zero = await ask({ [gold[0]]: 0 });
    assert.equal(zero.choices[0].message.content, plain.choices[0].message.content);
    const forced = await ask({ [gold[3]]: 100 });
    const toks = forced.choices[0].logprobs.content.map((t) => t.token);
    assert.equal(toks.length, 6);
    assert.ok(toks.every((t) => t === toks[0]), `+100 forces one token every step: ${JSON.stringify(toks)}`);
    /* also on /v1/completions (raw) */
    const rc = await jfetch(server.url + '/v1/completions', {
      body: { prompt: ONCE, temperature: 0, max_tokens: 4, logit_bias: { [gold[0]]: -100 } },
    });
    assert.equal(rc.status, 200, rc.text);
    assert.ok(!GOLD.startsWith(rc.json.choices[0].text), `banned first token still generated: ${rc.json.choices[0].text}`);
    for (const bad of [{ 512: 1 }, { abc: 1 }, { 5: 101 }]) {
      await assert.rejects(ask(bad), (e) => {
        assert.equal(e.status, 400, `logit_bias ${JSON.stringify(bad)}`);
        assert.equal(e.param, 'logit_bias');
        return true;
      });
    }
  });

  it('logprobs + top_logprobs: one entry per token, well-formed', async () => {
    const r = await client.chat.completions.create({
      model: 'm', messages: [{ role: 'user', content: ONCE }], temperature: 0, max_tokens: 8,
      logprobs: true, top_logprobs: 3,
    });
    const c = r.choices[0];
    const lp = c.logprobs?.content;
    assert.ok(Array.isArray(lp), `logprobs.content missing: ${JSON.stringify(c.logprobs)}`);
    assert.equal(lp.length, 8);
    assert.equal(lp.map((t) => t.token).join(''), c.message.content, 'tokens join to the content');
    for (const t of lp) {
      assert.equal(typeof t.token, 'string');
      assert.ok(Number.isFinite(t.logprob) && t.logprob <= 0, `logprob ${t.logprob}`);
      assert.ok(Array.isArray(t.bytes));
      assert.equal(Buffer.from(t.bytes).toString('utf8'), t.token);
      assert.equal(t.top_logprobs.length, 3);
      for (let i = 0; i < 3; i++) {
        const a = t.top_logprobs[i];
        assert.equal(typeof a.token, 'string');
        assert.ok(Number.isFinite(a.logprob) && a.logprob <= 0);
        if (i) assert.ok(a.logprob <= t.top_logprobs[i - 1].logprob, 'alternatives sorted, most likely first');
      }
      /* greedy: the chosen token is the most likely one */
      assert.equal(t.top_logprobs[0].token, t.token);
      assert.ok(Math.abs(t.top_logprobs[0].logprob - t.logprob) < 1e-4);
    }
    const off = await client.chat.completions.create({
      model: 'm', messages: [{ role: 'user', content: ONCE }], temperature: 0, max_tokens: 4,
    });
    assert.equal(off.choices[0].logprobs ?? null, null, 'no logprobs unless asked');
  });

  it('logprobs in a stream come with each content chunk', async () => {
    const s = await collectStream(await client.chat.completions.create({
      model: 'm', messages: [{ role: 'user', content: ONCE }], temperature: 0, max_tokens: 8,
      logprobs: true, top_logprobs: 2, stream: true,
    }));
    const toks = s.chunks.flatMap((ch) => ch.choices.flatMap((c) => c.logprobs?.content ?? []));
    assert.equal(toks.length, 8);
    assert.equal(toks.map((t) => t.token).join(''), s.text);
  });

  it('completions logprobs.text_offset counts characters from the start, across stream chunks', async () => {
    const body = { model: 'm', prompt: ONCE, temperature: 0, max_tokens: 12, logprobs: 2 };
    const whole = await client.completions.create(body);
    const lp = whole.choices[0].logprobs;
    assert.equal(lp.tokens.length, 12);
    let at = 0;
    for (let i = 0; i < lp.tokens.length; i++) {
      assert.equal(lp.text_offset[i], at, `token ${i}`);
      at += [...lp.tokens[i]].length;
    }
    const s = await collectStream(await client.completions.create({ ...body, stream: true }));
    const offs = s.chunks.flatMap((ch) => ch.choices.flatMap((c) => c.logprobs?.text_offset ?? []));
    assert.deepEqual(offs, lp.text_offset, 'the same offsets streamed, chunk after chunk');
  });

  it('a repeated prompt reports cached (reused) prompt tokens', async () => {
    const prompt = 'Lily and Tom went to the park. They saw a big';
    const body = { model: 'm', messages: [{ role: 'user', content: prompt }], temperature: 0, max_tokens: 4 };
    await client.chat.completions.create(body);
    const r = await client.chat.completions.create(body);
    const cached = r.usage.prompt_tokens_details?.cached_tokens;
    assert.equal(typeof cached, 'number', `usage: ${JSON.stringify(r.usage)}`);
    assert.ok(cached > 0 && cached <= r.usage.prompt_tokens, `cached_tokens ${cached} of ${r.usage.prompt_tokens}`);
    assert.equal(r.choices[0].message.content, GOLDEN[prompt].slice(0, r.choices[0].message.content.length));
  });

  it('legacy completions (SDK), non-streaming and streaming, equal the golden text', async () => {
    const r = await client.completions.create({ model: 'm', prompt: ONCE, temperature: 0, max_tokens: GOLDEN_N });
    assert.equal(r.object, 'text_completion');
    assert.match(r.id, /^cmpl-/);
    assert.equal(r.choices[0].text, GOLD);
    assert.equal(r.choices[0].finish_reason, 'length');
    assert.equal(r.usage.prompt_tokens, GOLDEN_PROMPT_TOKENS[ONCE]);
    assert.equal(r.usage.completion_tokens, GOLDEN_N);

    const s = await collectStream(await client.completions.create({
      model: 'm', prompt: ONCE, temperature: 0, max_tokens: GOLDEN_N, stream: true,
    }));
    assert.equal(s.text, GOLD);
    assert.equal(s.finish, 'length');
    for (const ch of s.chunks) assert.equal(ch.object, 'text_completion');
  });

  it('completions: prompt as token ids and with a stop string', async () => {
    const ids = [1, 403, 407, 261, 378]; /* BOS + "Once upon a time" (golden tokenize) */
    const r = await client.completions.create({ model: 'm', prompt: ids, temperature: 0, max_tokens: 16 });
    assert.ok(GOLD.startsWith(r.choices[0].text) && r.choices[0].text.length > 0, r.choices[0].text);
    const st = await client.completions.create({ model: 'm', prompt: ONCE, temperature: 0, max_tokens: 64, stop: 'named' });
    assert.equal(st.choices[0].text, ', there was a little girl ');
    assert.equal(st.choices[0].finish_reason, 'stop');
  });
});
