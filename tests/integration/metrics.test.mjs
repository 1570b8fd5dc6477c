/*
 * metrics.test.mjs — GET /metrics: Prometheus text that `promtool check
 * metrics` accepts, with kvpark_requests_total counting requests; behind
 * --metrics-key it (and /health) needs that key. Also --max-tokens, the
 * default max_tokens of a request that gives none.
 *
 * Why: operators scrape /metrics with Prometheus; a malformed exposition
 * silently drops every series, so it is checked with Prometheus' own linter.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import { after, before, describe, it } from 'node:test';
import { ONCE, chatBody, jfetch, startServer } from './helpers.mjs';

const PROMTOOL = process.env.PROMTOOL || '/usr/bin/promtool';

/* Sum of every sample of a family (all label sets). */
function total(text, name) {
  let sum = 0;
  for (const line of text.split('\n')) {
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/);
    if (m && m[1] === name) sum += Number(m[3]);
  }
  return sum;
}

describe('metrics', { timeout: 60000 }, () => {
  let open;
  let locked;
  before(async () => {
    [open, locked] = await Promise.all([
      startServer({ args: ['-c', '256'] }),
      startServer({ args: ['-c', '256', '--api-key', 'api-k', '--metrics-key', 'metrics-k', '--max-tokens', '16'], healthKey: 'metrics-k' }),
    ]);
  });
  after(async () => { await Promise.all([open?.stop(), locked?.stop()]); });

  it('/metrics is Prometheus text with kvpark_requests_total, accepted by promtool', async (t) => {
    const before = await jfetch(open.url + '/metrics', { method: 'GET' });
    assert.equal(before.status, 200);
    assert.match(before.headers.get('content-type') || '', /^text\/plain/);
    const r = await jfetch(open.baseURL + '/chat/completions', { body: chatBody(ONCE, { max_tokens: 4 }) });
    assert.equal(r.status, 200);
    await jfetch(open.url + '/v1/nope', { method: 'GET' });
    const m = await jfetch(open.url + '/metrics', { method: 'GET' });
    assert.equal(m.status, 200);
    assert.match(m.text, /^# HELP kvpark_requests_total /m);
    assert.match(m.text, /^# TYPE kvpark_requests_total counter$/m);
    assert.ok(total(m.text, 'kvpark_requests_total') > total(before.text, 'kvpark_requests_total'),
      'kvpark_requests_total did not grow after a request');

    if (!fs.existsSync(PROMTOOL)) { t.skip(`${PROMTOOL} not installed`); return; }
    const pt = spawnSync(PROMTOOL, ['check', 'metrics'], { input: m.text, encoding: 'utf8', timeout: 20000 });
    assert.equal(pt.status, 0, `promtool check metrics failed:\n${pt.stdout}${pt.stderr}`);
  });

  it('with --metrics-key, /health and /metrics need that key', async () => {
    const h0 = await jfetch(locked.url + '/health', { method: 'GET' });
    assert.equal(h0.status, 401);
    const h1 = await jfetch(locked.url + '/health', { method: 'GET', headers: { authorization: 'Bearer metrics-k' } });
    assert.equal(h1.status, 200);
    const none = await jfetch(locked.url + '/metrics', { method: 'GET' });
    assert.equal(none.status, 401);
    const wrong = await jfetch(locked.url + '/metrics', { method: 'GET', headers: { authorization: 'Bearer nope' } });
    assert.equal(wrong.status, 401);
    const ok = await jfetch(locked.url + '/metrics', { method: 'GET', headers: { authorization: 'Bearer metrics-k' } });
    assert.equal(ok.status, 200);
    assert.match(ok.text, /kvpark_requests_total/);
  });

  it('--max-tokens is the default when a request gives none', async () => {
    const h = { authorization: 'Bearer api-k' };
    const dflt = await jfetch(locked.baseURL + '/chat/completions', { body: chatBody(ONCE), headers: h });
    assert.equal(dflt.status, 200, dflt.text);
    assert.equal(dflt.json.usage.completion_tokens, 16);
    assert.equal(dflt.json.choices[0].finish_reason, 'length');
    const more = await jfetch(locked.baseURL + '/chat/completions', { body: chatBody(ONCE, { max_tokens: 20 }), headers: h });
    assert.equal(more.status, 200, more.text);
    assert.equal(more.json.usage.completion_tokens, 20);
  });
});
