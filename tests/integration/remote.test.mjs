/*
 * remote.test.mjs — two replicas sharing one Redis (--remote): a conversation
 * saved on one is resumed on the other, and Redis going away never hurts the
 * sessions a replica holds.
 *
 *   1. A saves a session; B, which never saw it, continues it from Redis: the
 *      same answer as A gives for the same turn, with the saved tokens counted
 *      as cached, a restore from tier "remote" in B's metrics, and the remote
 *      tier "up" in B's /health.
 *   2. Ownership holds across replicas (the replicas share the owner secret
 *      through Redis): another API key gets 404 on B.
 *   3. A and B save one id at once: a third replica resumes one whole version
 *      (A's or B's: its answer and prompt length match one of theirs).
 *   4. A holds an older copy of a session that B continued and saved: A
 *      answers the whole history exactly as B does (reusing only what its
 *      copy shares), and A's next save is what a fresh replica resumes.
 *   5. A delete on B reaches Redis: A's copy is local, but a third replica
 *      cannot resurrect the session.
 *   6. Redis stopped: a session only in Redis is a 503 with Retry-After (no
 *      hang); one whose record B indexed before (its token ids) is recomputed
 *      and answers as A does (cached_tokens 0, counted as "recomputed");
 *      sessions local to the replica answer as before, /health says "down"
 *      and the server stays healthy.
 *
 * Skips (and says so) where redis-server is not installed.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import { after, before, describe, it } from 'node:test';
import { ONCE, jfetch, metricValue, sleep, startRedis, startServer, tmpDir, waitFor } from './helpers.mjs';

const HAVE_REDIS = spawnSync('redis-server', ['--version']).status === 0;
const KA = 'key-remote-a';
const KB = 'key-remote-b';
const hA = { authorization: `Bearer ${KA}` };
const hB = { authorization: `Bearer ${KB}` };

const turn = (sid, content, max_tokens = 16) => ({
  model: 'm', temperature: 0, max_tokens, session_id: sid, messages: [{ role: 'user', content }],
});

describe('remote tier: two replicas and one Redis', { skip: HAVE_REDIS ? false : 'redis-server is not installed', timeout: 120000 }, () => {
  let redis;
  let a;
  let b;
  const dirs = [];
  const url = () => `redis://127.0.0.1:${redis.port}`;
  const args = (dir) => ['-c', '512', '--api-key', KA, '--api-key', KB, '--cold-dir', dir, '--remote', url(),
    '--remote-timeout', '500'];

  before(async () => {
    dirs.push(tmpDir('redis'), tmpDir('repA'), tmpDir('repB'), tmpDir('repC'), tmpDir('repD'), tmpDir('repE'));
    redis = await startRedis(dirs[0]);
    a = await startServer({ args: args(dirs[1]) });
    b = await startServer({ args: args(dirs[2]) }); /* after A: takes A's owner secret from Redis */
  });
  after(async () => {
    await Promise.all([a?.stop(), b?.stop()]);
    try { redis?.proc.kill('SIGKILL'); } catch { /* gone */ }
    for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
  });

  let sid;
  let sid2;
  it('a session saved on A is resumed on B from Redis: same answer, tokens cached, tier "remote"', async () => {
    const c = await jfetch(a.url + '/v1/sessions', { body: {}, headers: hA });
    assert.equal(c.status, 200, c.text);
    sid = c.json.id;
    const t1 = await jfetch(a.baseURL + '/chat/completions', { body: turn(sid, ONCE), headers: hA });
    assert.equal(t1.status, 200, t1.text);
    const saved = await jfetch(a.url + `/v1/sessions/${sid}/save`, { headers: hA });
    assert.equal(saved.status, 200, saved.text);
    /* the write-through copy reaches Redis asynchronously: B retries a 404 for a moment */
    let onB;
    for (let i = 0; i < 50; i++) {
      onB = await jfetch(b.baseURL + '/chat/completions', { body: turn(sid, 'And then?'), headers: hA });
      if (onB.status !== 404) break;
      await sleep(100);
    }
    assert.equal(onB.status, 200, onB.text);
    assert.ok(onB.json.usage.prompt_tokens_details?.cached_tokens > 0, `nothing cached: ${JSON.stringify(onB.json.usage)}`);
    const onA = await jfetch(a.baseURL + '/chat/completions', { body: turn(sid, 'And then?'), headers: hA });
    assert.equal(onA.status, 200, onA.text);
    assert.equal(onB.json.choices[0].message.content, onA.json.choices[0].message.content);
    const m = (await jfetch(b.url + '/metrics', { method: 'GET', headers: hA })).text;
    assert.ok(metricValue(m, 'kvpark_session_restore_seconds_count', { tier: 'remote' }) >= 1, m);
    assert.ok(metricValue(m, 'kvpark_remote_events_total', { event: 'hit' }) >= 1, m);
    const h = await jfetch(b.url + '/health', { method: 'GET' });
    assert.equal(h.status, 200);
    assert.equal(h.json.remote.state, 'up', h.text);
  });

  it('ownership holds across replicas: another key gets 404 on B', async () => {
    const c = await jfetch(a.url + '/v1/sessions', { body: {}, headers: hA });
    sid2 = c.json.id;
    assert.equal((await jfetch(a.baseURL + '/chat/completions', { body: turn(sid2, ONCE, 4), headers: hA })).status, 200);
    assert.equal((await jfetch(a.url + `/v1/sessions/${sid2}/save`, { headers: hA })).status, 200);
    await sleep(300);
    const other = await jfetch(b.baseURL + '/chat/completions', { body: turn(sid2, 'Hi'), headers: hB });
    assert.equal(other.status, 404, other.text);
  });

  it('A and B save one session concurrently: a third replica gets one whole version, never a mix', async () => {
    const c0 = await jfetch(a.url + '/v1/sessions', { body: {}, headers: hA });
    const sid3 = c0.json.id;
    assert.equal((await jfetch(a.baseURL + '/chat/completions', { body: turn(sid3, ONCE, 8), headers: hA })).status, 200);
    assert.equal((await jfetch(a.url + `/v1/sessions/${sid3}/save`, { headers: hA })).status, 200);
    let r;
    for (let i = 0; i < 50; i++) { /* B adopts it from Redis */
      r = await jfetch(b.baseURL + '/chat/completions', { body: turn(sid3, 'The cat', 8), headers: hA });
      if (r.status !== 404) break;
      await sleep(100);
    }
    assert.equal(r.status, 200, r.text);
    /* now the two replicas hold different conversations under one id; both save at once */
    assert.equal((await jfetch(a.baseURL + '/chat/completions', { body: turn(sid3, 'The dog', 8), headers: hA })).status, 200);
    const [sa, sb] = await Promise.all([
      jfetch(a.url + `/v1/sessions/${sid3}/save`, { headers: hA }),
      jfetch(b.url + `/v1/sessions/${sid3}/save`, { headers: hA })]);
    assert.equal(sa.status, 200, sa.text);
    assert.equal(sb.status, 200, sb.text);
    await sleep(800); /* both write-through copies reach Redis */
    const probe = turn(sid3, 'The end.', 8);
    const [ra, rb] = await Promise.all([
      jfetch(a.baseURL + '/chat/completions', { body: probe, headers: hA }),
      jfetch(b.baseURL + '/chat/completions', { body: probe, headers: hA })]);
    const c = await startServer({ args: args(dirs[4]) });
    try {
      const rc = await jfetch(c.baseURL + '/chat/completions', { body: probe, headers: hA });
      assert.equal(rc.status, 200, rc.text);
      const got = [rc.json.choices[0].message.content, rc.json.usage.prompt_tokens];
      const want = [ra, rb].map((x) => [x.json.choices[0].message.content, x.json.usage.prompt_tokens]);
      assert.ok(want.some((w) => w[0] === got[0] && w[1] === got[1]),
        `C's answer ${JSON.stringify(got)} is neither A's nor B's version: ${JSON.stringify(want)}`);
    } finally {
      await c.stop();
    }
  });

  it('A holds an older copy of a session B continued: A answers the whole history as B does, ' +
     'and its save is the newest version for everyone', async () => {
    const chat = (srv, id, messages) => jfetch(srv.baseURL + '/chat/completions', {
      headers: hA, body: { model: 'm', temperature: 0, max_tokens: 12, session_id: id, messages } });
    const c = await jfetch(a.url + '/v1/sessions', { body: {}, headers: hA });
    const id = c.json.id;
    const h1 = [{ role: 'user', content: 'Tom had a red ball.' }];
    const r1 = await chat(a, id, h1);
    assert.equal(r1.status, 200, r1.text);
    assert.equal((await jfetch(a.url + `/v1/sessions/${id}/save`, { headers: hA })).status, 200);
    await waitFor('A\'s save to reach Redis', async () =>
      (await jfetch(a.url + '/health', { method: 'GET' })).json.remote?.queued === 0);
    const h2 = [...h1, r1.json.choices[0].message, { role: 'user', content: 'Where did he throw it?' }];
    const r2 = await chat(b, id, h2); /* B adopts A's version and continues it */
    assert.equal(r2.status, 200, r2.text);
    assert.ok(r2.json.usage.prompt_tokens_details.cached_tokens > 0, r2.text);
    assert.equal((await jfetch(b.url + `/v1/sessions/${id}/save`, { headers: hA })).status, 200);
    await waitFor('B\'s save to reach Redis', async () =>
      (await jfetch(b.url + '/health', { method: 'GET' })).json.remote?.queued === 0);
    const h3 = [...h2, r2.json.choices[0].message, { role: 'user', content: 'And then?' }];
    const onA = await chat(a, id, h3); /* A still has the first version */
    const onB = await chat(b, id, h3);
    assert.equal(onA.status, 200, onA.text);
    assert.equal(onA.json.choices[0].message.content, onB.json.choices[0].message.content);
    assert.ok(onA.json.usage.prompt_tokens_details.cached_tokens < onB.json.usage.prompt_tokens_details.cached_tokens,
      'A reused only what its older copy shares');
    assert.equal((await jfetch(a.url + `/v1/sessions/${id}/save`, { headers: hA })).status, 200);
    await waitFor('A\'s save to reach Redis', async () =>
      (await jfetch(a.url + '/health', { method: 'GET' })).json.remote?.queued === 0);
    const d = await startServer({ args: args(dirs[5]) });
    try {
      const h4 = [...h3, onA.json.choices[0].message, { role: 'user', content: 'Why?' }];
      const onD = await chat(d, id, h4);
      assert.equal(onD.status, 200, onD.text);
      assert.ok(onD.json.usage.prompt_tokens_details.cached_tokens >= onA.json.usage.prompt_tokens,
        `D resumed A's newest version: ${onD.text}`);
    } finally {
      await d.stop();
    }
  });

  it('a delete on B reaches Redis: a third replica cannot resume the session', async () => {
    const d = await jfetch(b.url + `/v1/sessions/${sid}`, { method: 'DELETE', headers: hA });
    assert.equal(d.status, 200, d.text);
    await sleep(500);
    const c = await startServer({ args: args(dirs[3]) });
    try {
      const r = await jfetch(c.baseURL + '/chat/completions', { body: turn(sid, 'Hi'), headers: hA });
      assert.equal(r.status, 404, r.text);
    } finally {
      await c.stop();
    }
  });

  it('Redis stopped: a session B knows is recomputed from its token ids; one only in Redis is 503 + ' +
     'Retry-After; local sessions unaffected', async () => {
    const c = await jfetch(a.url + '/v1/sessions', { body: {}, headers: hA });
    const sid4 = c.json.id; /* saved on A, never seen by B: only Redis has it for B */
    assert.equal((await jfetch(a.baseURL + '/chat/completions', { body: turn(sid4, ONCE, 4), headers: hA })).status, 200);
    assert.equal((await jfetch(a.url + `/v1/sessions/${sid4}/save`, { headers: hA })).status, 200);
    await sleep(500);
    redis.proc.kill('SIGKILL');
    await new Promise((r) => redis.proc.once('exit', r));
    const t0 = Date.now();
    const r = await jfetch(b.baseURL + '/chat/completions', { body: turn(sid4, 'Hi'), headers: hA });
    assert.equal(r.status, 503, r.text);
    assert.equal(r.headers.get('retry-after'), '1');
    assert.equal(r.json.error.code, 'remote_unavailable');
    assert.ok(Date.now() - t0 < 20000, 'answered without hanging');
    /* sid2: B indexed its record (case 2) but never fetched its KV: its token
     * ids are here, so B recomputes the KV and answers as A does */
    const onB = await jfetch(b.baseURL + '/chat/completions', { body: turn(sid2, 'Hi', 8), headers: hA });
    assert.equal(onB.status, 200, onB.text);
    assert.equal(onB.json.usage.prompt_tokens_details?.cached_tokens ?? 0, 0, 'recomputed, nothing restored');
    /* A holds sid2 itself: unaffected */
    const local = await jfetch(a.baseURL + '/chat/completions', { body: turn(sid2, 'Hi', 8), headers: hA });
    assert.equal(local.status, 200, local.text);
    assert.equal(onB.json.choices[0].message.content, local.json.choices[0].message.content);
    const m = (await jfetch(b.url + '/metrics', { method: 'GET', headers: hA })).text;
    assert.ok(metricValue(m, 'kvpark_session_events_total', { event: 'recomputed', tier: 'remote' }) >= 1, m);
    assert.match(b.log(), new RegExp(`session ${sid2}: its KV cannot be restored from remote`));
    const h = await jfetch(b.url + '/health', { method: 'GET' });
    assert.equal(h.status, 200);
    assert.equal(h.json.status, 'ok');
    assert.equal(h.json.remote.state, 'down', h.text);
  });
});
