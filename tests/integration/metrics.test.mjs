/*
 * metrics.test.mjs — GET /metrics: Prometheus text that `promtool check
 * metrics` and a strict line checker (helpers.mjs parseExposition) accept,
 * with kvpark_requests_total counting requests; every known series present
 * at 0 on a fresh server, and traffic adds none that was not; what
 * kvpark_sessions and kvpark_kv_bytes count for a saved, parked session;
 * behind --metrics-key it (and /health) needs that key. Also --max-tokens,
 * the default max_tokens of a request that gives none.
 *
 * Why: operators scrape /metrics with Prometheus; a malformed exposition
 * silently drops every series, and a series that only appears on its first
 * increment hides that increment from rate().
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import { after, before, describe, it } from 'node:test';
import {
  ONCE, chatBody, exposedSeries, jfetch, listSessions, metricValue, newSession, parseExposition, sse,
  startServer, tmpDir, waitFor,
} from './helpers.mjs';

const PROMTOOL = process.env.PROMTOOL || '/usr/bin/promtool';

/* Texts the strict checker must refuse (so that its passing means something). */
const HEAD = '# HELP a_total h\n# TYPE a_total counter\n';
const BAD_EXPOSITIONS = {
  'no final newline': HEAD + 'a_total 1',
  'blank line': HEAD + '\na_total 1\n',
  'HELP twice': HEAD + '# HELP a_total h\na_total 1\n',
  'TYPE twice': HEAD + '# TYPE a_total counter\na_total 1\n',
  'TYPE after samples': '# HELP a_total h\na_total 1\n# TYPE a_total counter\n',
  'no TYPE': '# HELP a_total h\na_total 1\n',
  'no HELP': '# TYPE a_total counter\na_total 1\n',
  'unknown type': '# HELP a_total h\n# TYPE a_total countr\na_total 1\n',
  'duplicate series': HEAD + 'a_total{x="1"} 1\na_total{x="1"} 2\n',
  'duplicate series, labels reordered': HEAD + 'a_total{x="1",y="2"} 1\na_total{y="2",x="1"} 2\n',
  'label twice': HEAD + 'a_total{x="1",x="2"} 1\n',
  'unescaped quote': HEAD + 'a_total{x="a"b"} 1\n',
  'bad escape': HEAD + 'a_total{x="a\\tb"} 1\n',
  'unterminated value': HEAD + 'a_total{x="a} 1\n',
  'trailing comma': HEAD + 'a_total{x="1",} 1\n',
  'bad label name': HEAD + 'a_total{1x="1"} 1\n',
  'reserved label name': HEAD + 'a_total{__x="1"} 1\n',
  'bad value': HEAD + 'a_total 1,5\n',
  'two spaces': HEAD + 'a_total  1\n',
  'negative counter': HEAD + 'a_total -1\n',
  'bad HELP escape': '# HELP a_total h\\x\n# TYPE a_total counter\na_total 1\n',
  'not contiguous': HEAD + 'a_total 1\n# HELP b h\n# TYPE b gauge\nb 1\na_total{x="2"} 1\n',
  'histogram without +Inf': '# HELP h h\n# TYPE h histogram\nh_bucket{le="1"} 1\nh_sum 1\nh_count 1\n',
  'histogram not cumulative': '# HELP h h\n# TYPE h histogram\nh_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\nh_sum 1\nh_count 1\n',
  'histogram +Inf != count': '# HELP h h\n# TYPE h histogram\nh_bucket{le="+Inf"} 2\nh_sum 1\nh_count 1\n',
  'histogram without _sum': '# HELP h h\n# TYPE h histogram\nh_bucket{le="+Inf"} 1\nh_count 1\n',
  'le outside a bucket': HEAD + 'a_total{le="1"} 1\n',
};
const GOOD_EXPOSITION = HEAD + 'a_total{x="q\\"\\\\\\n",y=""} 1\na_total 2.5e+3\n' +
  '# HELP h t\\\\x\\n\n# TYPE h histogram\nh_bucket{k="v",le="0.5"} 1\nh_bucket{k="v",le="+Inf"} 3\nh_sum{k="v"} NaN\nh_count{k="v"} 3\n';

/* Sum of every sample of a family (all label sets). */
function total(text, name) {
  let sum = 0;
  for (const line of text.split('\n')) {
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/);
    if (m && m[1] === name) sum += Number(m[3]);
  }
  return sum;
}

describe('metrics', { timeout: 120000 }, () => {
  let open;
  let locked;
  before(async () => {
    [open, locked] = await Promise.all([
      startServer({ args: ['-c', '256'] }),
      startServer({ args: ['-c', '256', '--api-key', 'api-k', '--metrics-key', 'metrics-k', '--max-tokens', '16'], healthKey: 'metrics-k' }),
    ]);
  });
  after(async () => { await Promise.all([open?.stop(), locked?.stop()]); });

  it('the strict exposition checker refuses malformed text and accepts good text', () => {
    for (const [what, text] of Object.entries(BAD_EXPOSITIONS)) {
      assert.throws(() => parseExposition(text), Error, `accepted: ${what}`);
    }
    const f = parseExposition(GOOD_EXPOSITION);
    assert.equal(f.get('a_total').samples[0].labels.x, 'q"\\\n');
    assert.equal(f.get('a_total').samples[1].value, 2500);
    assert.equal(f.get('h').help, 't\\x\n');
  });

  it('a fresh server lists every known series at 0 before any request', async () => {
    /* `open` has answered only the /health polls of startServer so far */
    const m = await jfetch(open.url + '/metrics', { method: 'GET' });
    assert.equal(m.status, 200);
    const series = exposedSeries(parseExposition(m.text));
    for (const s of [
      'kvpark_requests_total{endpoint="chat_completions",status="200"}',
      'kvpark_requests_total{endpoint="chat_completions",status="400"}',
      'kvpark_requests_total{endpoint="chat_completions",status="429"}',
      'kvpark_requests_total{endpoint="completions",status="200"}',
      'kvpark_requests_total{endpoint="sessions",status="200"}',
      'kvpark_requests_total{endpoint="sessions",status="404"}',
      'kvpark_requests_total{endpoint="models",status="200"}',
      'kvpark_requests_total{endpoint="other",status="404"}',
      'kvpark_session_events_total{event="park",tier="warm"}',
      'kvpark_session_events_total{event="restore",tier="cold"}',
      'kvpark_session_events_total{event="save",tier="cold"}',
      'kvpark_session_restore_seconds_count{tier="warm"}',
      'kvpark_session_restore_seconds_bucket{tier="cold",le="+Inf"}',
      'kvpark_sessions{tier="hot"}',
      'kvpark_kv_bytes{tier="cold"}',
      'kvpark_store_events{event="dropped"}',
    ]) {
      assert.equal(series.get(s), 0, `${s} is not listed at 0:\n${m.text}`);
    }
    assert.match(m.text, /^kvpark_requests_total\{endpoint="chat_completions",status="200"\} 0$/m);
  });

  it('traffic adds no series that a fresh server did not list, and counters only grow', async () => {
    const srv = await startServer({ args: ['-c', '256'] });
    try {
      const start = exposedSeries(parseExposition((await jfetch(srv.url + '/metrics', { method: 'GET' })).text));
      const sid = await newSession(srv);
      const statuses = await Promise.all([
        jfetch(srv.baseURL + '/chat/completions', { body: chatBody(ONCE, { max_tokens: 4 }) }),
        jfetch(srv.baseURL + '/chat/completions', { body: chatBody(ONCE, { max_tokens: 4, session_id: sid }) }),
        sse(srv.baseURL + '/chat/completions', chatBody(ONCE, { max_tokens: 4, stream: true })),
        jfetch(srv.baseURL + '/completions', { body: { model: 'm', prompt: ONCE, max_tokens: 4, temperature: 0 } }),
        jfetch(srv.baseURL + '/chat/completions', { body: '{"messages": [' }),
        jfetch(srv.baseURL + '/chat/completions', { body: chatBody(ONCE, { session_id: 'sess_nope' }) }),
        jfetch(srv.baseURL + '/chat/completions', { body: chatBody('x'.repeat(4000), { max_tokens: 4 }) }),
        jfetch(srv.baseURL + '/completions', { body: { model: 'm', prompt: ONCE, max_tokens: -1 } }),
        jfetch(srv.baseURL + '/models', { method: 'GET' }),
        jfetch(srv.baseURL + '/sessions', { method: 'GET' }),
        jfetch(srv.baseURL + `/sessions/${sid}`, { method: 'GET' }),
        jfetch(srv.baseURL + '/sessions/sess_nope', { method: 'GET' }),
        jfetch(srv.baseURL + '/sessions/sess_nope/frob', { body: {} }),
        jfetch(srv.url + '/v1/nope', { method: 'GET' }),
        jfetch(srv.url + '/health', { method: 'POST', body: {} }),
        jfetch(srv.url + '/metrics', { method: 'DELETE' }),
      ].map((p) => p.then((r) => r.status)));
      assert.ok(statuses.includes(200) && statuses.includes(400) && statuses.includes(404), String(statuses));
      assert.equal((await jfetch(srv.baseURL + `/sessions/${sid}`, { method: 'DELETE' })).status, 200);
      /* a stream the client leaves after its first chunk: counted as 499
       * (top_logprobs make it ~2 KB a token, more than the socket buffers
       * hold, so the server cannot have sent it all before the client left) */
      const ac = new AbortController();
      const res = await fetch(srv.baseURL + '/chat/completions', {
        method: 'POST', headers: { 'content-type': 'application/json' }, signal: ac.signal,
        body: JSON.stringify(chatBody(ONCE, { max_tokens: 220, stream: true, logprobs: true, top_logprobs: 20 })),
      });
      const rd = res.body.getReader();
      await rd.read();
      ac.abort();
      await rd.read().catch(() => {});
      /* a request counts once its connection is done: wait for all of them */
      const end = await waitFor('every request counted', async () => {
        const e = exposedSeries(parseExposition((await jfetch(srv.url + '/metrics', { method: 'GET' })).text));
        let n = 0;
        for (const [k, v] of e) if (k.startsWith('kvpark_requests_total{') && !/"(metrics|health)"/.test(k)) n += v;
        /* health and metrics aside; the session create and delete, the aborted stream */
        return n >= statuses.length - 2 + 2 + 1 && e.get('kvpark_requests_total{endpoint="chat_completions",status="499"}') >= 1 ? e : null;
      });
      const added = [...end.keys()].filter((k) => !start.has(k));
      assert.deepEqual(added, [], 'series that were not declared at start (add them to metrics_kvpark_series)');
      for (const [k, v] of start) {
        if (/_total\{|_total$|_count|_bucket/.test(k)) assert.ok(end.get(k) >= v, `${k} went down: ${v} -> ${end.get(k)}`);
      }
    } finally {
      await srv.stop();
    }
  });

  it('a saved, parked session: kvpark_sessions counts it once as warm; kvpark_kv_bytes counts its chunks in RAM and on disk', async () => {
    const dir = tmpDir('mcold');
    const srv = await startServer({ args: ['-c', '256', '--idle-park', '0.3', '--cold-dir', dir] });
    try {
      const sid = await newSession(srv);
      const r = await jfetch(srv.baseURL + '/chat/completions', { body: chatBody(ONCE, { max_tokens: 16, session_id: sid }) });
      assert.equal(r.status, 200, r.text);
      const saved = await jfetch(srv.baseURL + `/sessions/${sid}/save`, { body: {} });
      assert.equal(saved.status, 200, saved.text);
      await waitFor('the saved session parked', async () => (await listSessions(srv))[sid].tier !== 'hot', 10000);
      const listed = await listSessions(srv);
      const text = (await jfetch(srv.url + '/metrics', { method: 'GET' })).text;
      const fams = parseExposition(text);
      /* kvpark_sessions: each session once, in the tier GET /v1/sessions shows */
      assert.equal(listed[sid].tier, 'warm', JSON.stringify(listed[sid]));
      assert.equal(metricValue(text, 'kvpark_sessions'), Object.keys(listed).length);
      assert.equal(metricValue(text, 'kvpark_sessions', { tier: 'warm' }), 1, text);
      assert.equal(metricValue(text, 'kvpark_sessions', { tier: 'cold' }), 0, text);
      /* kvpark_kv_bytes: bytes per medium. The saved copy's files are on disk
       * (payload = file size minus the header, whose size is at offset 12)... */
      let onDisk = 0;
      for (const f of fs.readdirSync(dir, { recursive: true })) {
        if (!String(f).endsWith('.kvo')) continue;
        const b = fs.readFileSync(`${dir}/${f}`);
        onDisk += b.length - b.readUInt32LE(12);
      }
      assert.ok(onDisk > 0, 'no object files on disk after a save');
      assert.equal(metricValue(text, 'kvpark_kv_bytes', { tier: 'cold' }), onDisk, text);
      /* ...and the same chunks are still cached in RAM: counted in warm too */
      assert.equal(metricValue(text, 'kvpark_kv_bytes', { tier: 'warm' }), onDisk, text);
      assert.equal(metricValue(text, 'kvpark_kv_bytes', { tier: 'hot' }), 0, text);
      /* the park event names where the parked copy went: durable, so cold */
      assert.equal(metricValue(text, 'kvpark_session_events_total', { event: 'park', tier: 'cold' }), 1, text);
      /* ...and each HELP says which view it is, so nobody adds them up wrongly */
      assert.match(fams.get('kvpark_sessions').help, /counted once/);
      assert.match(fams.get('kvpark_sessions').help, /warm \(every chunk in RAM, even if a saved copy is also on disk\)/);
      assert.match(fams.get('kvpark_kv_bytes').help, /can be in warm and cold at once/);
      assert.match(fams.get('kvpark_kv_bytes').help, /do not split kvpark_sessions/);
      assert.match(fams.get('kvpark_session_events_total').help, /cold when it is durable on disk/);
    } finally {
      await srv.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

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

    parseExposition(m.text);
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
