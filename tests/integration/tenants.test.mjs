/*
 * tenants.test.mjs — one API key learns nothing about another key's prompts
 * through the prefix cache.
 *
 * Why: requests without a session reuse the longest matching prefix of an
 * idle sequence, and usage.prompt_tokens_details.cached_tokens says how much
 * matched. If that reuse crossed keys, key B could recover key A's prompt
 * token by token: send A's beginning plus a guess, and read from
 * cached_tokens whether the guess was right. The scheduler reuses a prefix
 * only from a sequence whose last owner is the asking key (scheduler.h).
 *
 * The same holds for parked sessions: their stored chunks are shared between
 * sessions of one key only (a save's bytes_new would otherwise tell B that A
 * holds the same conversation).
 *
 * Setup: two keys. --parallel 1 first (one anonymous slot, so every B probe
 * lands on the slot A just filled: the attack's best case), then the
 * default --parallel 4 (each key keeps its own hits side by side).
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { jfetch, startServer } from './helpers.mjs';

const KA = 'tenant-key-alpha';
const KB = 'tenant-key-bravo';
const hA = { authorization: `Bearer ${KA}` };
const hB = { authorization: `Bearer ${KB}` };

const SECRET = 'Once upon a time the door of the old tower opened only to the word blue moon river.';
/* B's guesses: A's beginning, cut at several places, plus a guessed continuation */
const cut = (n) => SECRET.split(' ').slice(0, n).join(' ');
const PROBES = [
  cut(3), cut(3) + ' time', cut(6), cut(6) + ' door', cut(6) + ' cat', cut(10),
  cut(10) + ' only', cut(14) + ' word red', cut(14) + ' word blue', SECRET,
];

const chat = async (srv, h, content) => {
  const r = await jfetch(srv.baseURL + '/chat/completions', {
    headers: h, body: { model: 'm', temperature: 0, max_tokens: 3, messages: [{ role: 'user', content }] },
  });
  assert.equal(r.status, 200, r.text);
  return { prompt: r.json.usage.prompt_tokens, cached: r.json.usage.prompt_tokens_details?.cached_tokens ?? 0 };
};

const complete = async (srv, h, prompt) => {
  const r = await jfetch(srv.baseURL + '/completions', {
    headers: h, body: { model: 'm', temperature: 0, max_tokens: 3, prompt },
  });
  assert.equal(r.status, 200, r.text);
  return { prompt: r.json.usage.prompt_tokens, cached: r.json.usage.prompt_tokens_details?.cached_tokens ?? 0 };
};

describe('tenants: the prefix cache never crosses API keys', { timeout: 120000 }, () => {
  let one; /* --parallel 1 */
  let four; /* --parallel 4 */
  const args = (p) => ['-c', '512', '--parallel', String(p), '--api-key', KA, '--api-key', KB];

  before(async () => {
    [one, four] = await Promise.all([startServer({ args: args(1) }), startServer({ args: args(4) })]);
  });
  after(async () => {
    await Promise.all([one?.stop(), four?.stop()]);
  });

  it('chat: A repeats its secret and hits; every probe of B reports 0 cached tokens', async () => {
    const a1 = await chat(one, hA, SECRET);
    assert.equal(a1.cached, 0, 'a fresh server has nothing cached');
    const a2 = await chat(one, hA, SECRET);
    assert.equal(a2.cached, a2.prompt - 1, `A's own repeat reuses its prefix: ${JSON.stringify(a2)}`);
    for (const probe of PROBES) {
      /* the only slot holds A's secret */
      const b = await chat(one, hB, probe);
      assert.equal(b.cached, 0, `B's probe "${probe}" reported ${b.cached} of ${b.prompt} tokens cached from A's prompt`);
      /* put it back (the slot was B's: A gets no hit from B's probe either) */
      const a = await chat(one, hA, SECRET);
      assert.equal(a.cached, 0, `A got a hit from B's probe in the slot: ${JSON.stringify(a)}`);
    }
  });

  it('completions (raw text, no template): the same', async () => {
    const a1 = await complete(one, hA, SECRET);
    const a2 = await complete(one, hA, SECRET);
    assert.ok(a2.cached > 0 && a2.cached === a2.prompt - 1, `A's own repeat: ${JSON.stringify([a1, a2])}`);
    for (const probe of PROBES) {
      const b = await complete(one, hB, probe);
      assert.equal(b.cached, 0, `B's probe "${probe}" reported ${b.cached} of ${b.prompt} tokens cached`);
      await complete(one, hA, SECRET);
    }
  });

  it('stored sessions share chunks only within a key: B\'s save of A\'s conversation stores every byte anew', async () => {
    const saved = async (h) => {
      const c = await jfetch(four.url + '/v1/sessions', { body: {}, headers: h });
      assert.equal(c.status, 200, c.text);
      const sid = c.json.id;
      const r = await jfetch(four.baseURL + '/chat/completions', {
        headers: h, body: { model: 'm', temperature: 0, max_tokens: 8, session_id: sid, messages: [{ role: 'user', content: SECRET }] },
      });
      assert.equal(r.status, 200, r.text);
      const sv = await jfetch(four.url + `/v1/sessions/${sid}/save`, { headers: h });
      assert.equal(sv.status, 200, sv.text);
      return sv.json;
    };
    const a1 = await saved(hA);
    const a2 = await saved(hA);
    const b1 = await saved(hB);
    assert.ok(a1.bytes_new > 0, JSON.stringify(a1));
    assert.ok(a2.bytes_new < a1.bytes_new, `A's second copy shares A's chunks: ${JSON.stringify([a1, a2])}`);
    assert.equal(b1.bytes_new, a1.bytes_new, `B's copy shares nothing with A's: ${JSON.stringify([a1, b1])}`);
  });

  it('--parallel 4: B gets nothing from A; each key keeps its own hits', async () => {
    const a1 = await chat(four, hA, SECRET);
    const a2 = await chat(four, hA, SECRET);
    assert.equal(a1.cached, 0);
    assert.equal(a2.cached, a2.prompt - 1);
    const b1 = await chat(four, hB, SECRET);
    assert.equal(b1.cached, 0, `B's identical prompt: ${JSON.stringify(b1)}`);
    const b2 = await chat(four, hB, SECRET);
    assert.equal(b2.cached, b2.prompt - 1, `B's own repeat hits its own slot: ${JSON.stringify(b2)}`);
    const a3 = await chat(four, hA, SECRET);
    assert.equal(a3.cached, a3.prompt - 1, `A's slot was kept: ${JSON.stringify(a3)}`);
  });
});
