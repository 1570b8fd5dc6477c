/*
 * tiers.test.mjs — sessions moving between the tiers on their own: the hot
 * tier's count limit (--hot-sessions) parks the least recently used idle
 * sessions, --idle-park parks idle ones, a tiny --warm-budget pushes parked
 * sessions down to disk, a tiny --cold-budget drops the oldest (counted,
 * never silently), and through all of it every conversation continues
 * exactly as on a server that never parked anything (greedy decoding).
 * Also: a clean SIGTERM parks unsaved hot sessions to disk, so a restart
 * loses nothing.
 *
 * Why: parking is only worth having if the user cannot tell it happened.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { after, before, describe, it } from 'node:test';
import {
  jfetch, listSessions as listTiers, metricValue, newSession, startServer, tmpDir, waitFor,
} from './helpers.mjs';

const PROMPTS = [
  'Once upon a time', 'Lily wanted to', 'The cat sat on', 'Tom had a big', 'One day a bird',
];
const turn = (history, user) => [...history, { role: 'user', content: user }];
const ask = async (srv, sid, messages, max = 16) => {
  const r = await jfetch(srv.baseURL + '/chat/completions', {
    body: { model: 'm', temperature: 0, max_tokens: max, messages, ...(sid ? { session_id: sid } : {}) },
  });
  assert.equal(r.status, 200, r.text);
  return r.json;
};
/* Two turns in each of PROMPTS.length sessions on `srv`, the second turn only
 * after every session had its first (so parking happens in between); returns
 * the second turns' texts and cached-token counts. */
async function twoTurns(srv, between = async () => {}) {
  const sids = [];
  const hist = [];
  for (const p of PROMPTS) {
    const sid = await newSession(srv);
    const m1 = turn([], p);
    const r1 = await ask(srv, sid, m1);
    sids.push(sid);
    hist.push([...m1, { role: 'assistant', content: r1.choices[0].message.content }]);
  }
  await between(sids);
  const out = [];
  for (let i = 0; i < PROMPTS.length; i++) {
    const r2 = await ask(srv, sids[i], turn(hist[i], 'What happened next?'));
    out.push({ text: r2.choices[0].message.content, cached: r2.usage.prompt_tokens_details?.cached_tokens ?? 0 });
  }
  return { sids, out };
}

describe('tiers', { timeout: 240000 }, () => {
  let ref;
  let refOut;
  before(async () => {
    ref = await startServer({ args: ['-c', '256'] });
    ({ out: refOut } = await twoTurns(ref));
  });
  after(async () => { await ref?.stop(); });

  it('--hot-sessions 2: the others are parked (warm) and come back identical', async () => {
    const srv = await startServer({ args: ['-c', '256', '--hot-sessions', '2'] });
    try {
      const { out } = await twoTurns(srv, async (sids) => {
        const tiers = await waitFor('at most 2 hot sessions', async () => {
          const t = await listTiers(srv);
          const hot = sids.filter((s) => t[s].tier === 'hot').length;
          return hot <= 2 ? t : null;
        });
        const parked = sids.filter((s) => tiers[s].tier === 'warm');
        assert.ok(parked.length >= 3, `expected >= 3 warm sessions: ${JSON.stringify(tiers)}`);
        for (const s of parked) assert.ok(tiers[s].bytes > 0 && tiers[s].tokens > 0, JSON.stringify(tiers[s]));
      });
      assert.deepEqual(out.map((o) => o.text), refOut.map((o) => o.text));
      for (let i = 0; i < out.length; i++) {
        assert.equal(out[i].cached, refOut[i].cached, `session ${i}: restored KV reused like a hot one`);
        assert.ok(out[i].cached > 0);
      }
      const m = await jfetch(srv.url + '/metrics', { method: 'GET' });
      assert.ok(metricValue(m.text, 'kvpark_session_events_total', { event: 'park', tier: 'warm' }) >= 3, m.text);
      assert.ok(metricValue(m.text, 'kvpark_session_events_total', { event: 'restore', tier: 'warm' }) >= 3, m.text);
      assert.ok(metricValue(m.text, 'kvpark_session_restore_seconds_count', { tier: 'warm' }) >= 3, m.text);
    } finally {
      await srv.stop();
    }
  });

  it('a KV in device memory is staged through host memory (forced on the CPU): same results', async () => {
    process.env.KVPARK_TEST_STAGE_KV = '1'; /* inherited by the spawned server only */
    let srv;
    try {
      srv = await startServer({ args: ['-c', '256', '--hot-sessions', '1'] });
    } finally {
      delete process.env.KVPARK_TEST_STAGE_KV;
    }
    try {
      assert.match(srv.log(), /staged through host memory/);
      const { out } = await twoTurns(srv, async (sids) => {
        await waitFor('parked sessions', async () => {
          const t = await listTiers(srv);
          return sids.filter((s) => t[s].tier === 'warm').length >= PROMPTS.length - 1;
        });
      });
      assert.deepEqual(out.map((o) => o.text), refOut.map((o) => o.text));
      assert.deepEqual(out.map((o) => o.cached), refOut.map((o) => o.cached));
    } finally {
      await srv.stop();
    }
  });

  it('three requests at once on a parked session restore it once', async () => {
    const srv = await startServer({ args: ['-c', '256', '--hot-sessions', '1'] });
    try {
      const sid = await newSession(srv);
      const m1 = turn([], PROMPTS[1]);
      const r1 = await ask(srv, sid, m1);
      const other = await newSession(srv); /* pushes sid out of the single hot slot */
      await ask(srv, other, turn([], PROMPTS[2]));
      await waitFor('the first session parked', async () => (await listTiers(srv))[sid].tier === 'warm');
      const restores = async () => metricValue((await jfetch(srv.url + '/metrics', { method: 'GET' })).text,
        'kvpark_session_events_total', { event: 'restore', tier: 'warm' });
      const before = await restores();
      const hist = [...m1, { role: 'assistant', content: r1.choices[0].message.content }];
      const res = await Promise.all([0, 1, 2].map(() => jfetch(srv.baseURL + '/chat/completions', {
        body: { model: 'm', temperature: 0, max_tokens: 16, session_id: sid, messages: turn(hist, 'What happened next?') },
      })));
      for (const r of res) {
        assert.equal(r.status, 200, r.text);
        assert.equal(r.json.choices[0].message.content, refOut[1].text);
      }
      assert.equal(await restores(), before + 1, 'restored more than once');
    } finally {
      await srv.stop();
    }
  });

  it('--idle-park: idle sessions are parked after the delay, not before', async () => {
    const srv = await startServer({ args: ['-c', '256', '--idle-park', '0.4'] });
    try {
      const sid = await newSession(srv);
      await ask(srv, sid, turn([], PROMPTS[0]));
      const t0 = await listTiers(srv);
      assert.equal(t0[sid].tier, 'hot', 'parked before it was idle');
      await waitFor('the idle session to be parked', async () => (await listTiers(srv))[sid].tier === 'warm', 5000);
    } finally {
      await srv.stop();
    }
  });

  it('a tiny --warm-budget pushes parked sessions down to disk; they come back identical', async () => {
    const dir = tmpDir('cold');
    const srv = await startServer({ args: ['-c', '256', '--hot-sessions', '1', '--warm-budget', '1', '--cold-dir', dir] });
    try {
      const { out } = await twoTurns(srv, async (sids) => {
        await waitFor('parked sessions on disk', async () => {
          const t = await listTiers(srv);
          return sids.filter((s) => t[s].tier === 'cold').length >= PROMPTS.length - 1;
        });
        assert.ok(fs.readdirSync(dir, { recursive: true }).some((f) => String(f).endsWith('.kvo')), 'no object files');
      });
      assert.deepEqual(out.map((o) => o.text), refOut.map((o) => o.text));
    } finally {
      await srv.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('a tiny --cold-budget drops the oldest sessions: counted, logged, 404 afterwards', async () => {
    const dir = tmpDir('drop');
    const srv = await startServer({
      args: ['-c', '256', '--hot-sessions', '1', '--warm-budget', '1', '--cold-budget', '160K', '--cold-dir', dir],
    });
    try {
      const sids = [];
      for (const p of PROMPTS) {
        const sid = await newSession(srv);
        await ask(srv, sid, turn([], p), 48);
        sids.push(sid);
      }
      const m = await waitFor('a dropped session in the metrics', async () => {
        const r = await jfetch(srv.url + '/metrics', { method: 'GET' });
        return metricValue(r.text, 'kvpark_store_events', { event: 'dropped' }) >= 1 ? r.text : null;
      });
      assert.ok(m);
      assert.match(srv.log(), /dropped/i, 'a drop must be logged');
      const t = await listTiers(srv);
      const gone = sids.filter((s) => !t[s]);
      /* read after the listing: drops only grow, so every gone session is counted */
      const m2 = await jfetch(srv.url + '/metrics', { method: 'GET' });
      const dropped = metricValue(m2.text, 'kvpark_store_events', { event: 'dropped' });
      assert.ok(gone.length >= 1 && gone.length <= dropped, `gone ${gone.length}, dropped ${dropped}`);
      assert.ok(!gone.includes(sids[sids.length - 1]), 'the most recent session was dropped');
      const r = await jfetch(srv.baseURL + '/chat/completions', {
        body: { model: 'm', max_tokens: 4, session_id: gone[0], messages: [{ role: 'user', content: 'hi' }] },
      });
      assert.equal(r.status, 404, r.text);
    } finally {
      await srv.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('SIGTERM parks unsaved hot sessions to disk: after a restart they continue identically', async () => {
    const dir = tmpDir('term');
    let srv = await startServer({ args: ['-c', '256', '--cold-dir', dir] });
    try {
      const sid = await newSession(srv);
      const m1 = turn([], PROMPTS[0]);
      const r1 = await ask(srv, sid, m1);
      const hist = [...m1, { role: 'assistant', content: r1.choices[0].message.content }];
      const ex = await srv.stop();
      assert.ok(!ex.killed, 'SIGTERM did not stop the server in time');
      srv = await startServer({ args: ['-c', '256', '--cold-dir', dir] });
      const t = await listTiers(srv);
      assert.ok(t[sid], `session lost over a clean restart: ${JSON.stringify(t)}`);
      assert.equal(t[sid].tier, 'cold');
      const r2 = await ask(srv, sid, turn(hist, 'What happened next?'));
      assert.equal(r2.choices[0].message.content, refOut[0].text);
      assert.equal(r2.usage.prompt_tokens_details?.cached_tokens, refOut[0].cached);
    } finally {
      await srv.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
