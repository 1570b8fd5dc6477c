/*
 * faults.test.mjs — the session store under faults:
 *
 *   1. kill -9 of the server at random moments while it parks and saves
 *      (50 times, seeded PRNG, the seed is printed): every session whose save
 *      was acknowledged (a 200 came back) is listed after the restart,
 *      restores, holds at least the acknowledged tokens, and its next turn is
 *      exactly what a reference server that never crashed answers.
 *   2. Disk full while parking (a small tmpfs as --cold-dir when we are root
 *      and may mount one, else a file-size limit: `ulimit -f`, EFBIG): the
 *      server keeps serving, reports the error (log, /metrics, an OpenAI-style
 *      5xx for an explicit save), the session stays in its tier and continues
 *      correctly; once there is room again it saves and survives a restart.
 *   3. Flipped bits and truncations in every part of a session record
 *      (header fields, manifest, extra bytes, checksums) and in object files:
 *      quarantined at restart (files under DIR/quarantine, counted in
 *      /metrics), the other sessions intact. A damaged record is gone (404:
 *      its token ids are unreadable); a session whose objects are damaged
 *      keeps its token ids, so its next request recomputes the KV (a
 *      re-prefill: cached_tokens 0) and answers exactly like the reference,
 *      logged and counted (kvpark_session_events_total{event="recomputed"});
 *      the same for an object corrupted while the server runs; no other
 *      session is harmed.
 *   4. 200 sessions parked and restored concurrently with live traffic:
 *      every continuation equals the reference, no 5xx.
 *
 * Why: a parked conversation is only worth something if it survives the
 * crashes, full disks and bit rot that real machines have, and a fault in
 * one session must never leak into another.
 *
 * Reference answers come from one server that never parks or crashes, asked
 * statelessly (the whole history in the request, greedy, codec none), and
 * are cached by history.
 * Env: KVPARK_FAULT_SEED (replay a run), KVPARK_FAULT_KILLS (default 50),
 *      KVPARK_FAULT_NO_TMPFS=1 (force the ulimit variant of test 2).
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import {
  GOLDEN, ONCE, assertErrorShape, jfetch, killServer, listSessions, metricValue, newSession, sleep, startServer,
  startServerWrapped, tmpDir, waitFor,
} from './helpers.mjs';

const SEED = process.env.KVPARK_FAULT_SEED !== undefined
  ? Number(process.env.KVPARK_FAULT_SEED) >>> 0
  : (Date.now() ^ (process.pid << 16)) >>> 0;
const KILLS = Number(process.env.KVPARK_FAULT_KILLS || 50);

/* mulberry32: a small seeded PRNG, so a failing run can be replayed. */
function mulberry32(a) {
  return () => {
    a = (a + 0x6d2b79f5) | 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
const pick = (rng, v) => v[Math.floor(rng() * v.length)];

const PROMPTS = [
  'Once upon a time', 'Lily wanted to', 'The cat sat on', 'Tom had a big', 'One day a bird',
  'The sun was hot', 'A little dog', 'Mom said to', 'The boy ran to', 'In the park',
  'Sam and Mia', 'The big tree', 'Ben found a', 'The little fish', 'It was a rainy day',
  'Anna liked to', 'The red ball', 'A small frog', 'Grandpa told a', 'The happy bear',
  'Max saw a', 'The old car', 'Sue made a cake', 'The moon was', 'A kind girl',
];
const USERS = ['What happened next?', 'And then?', 'Why?', 'Tell me more.', 'Who was there?', 'Was she happy?'];

/* ---- small helpers ---------------------------------------------------- */

const chatReq = (srv, messages, { sid, max = 10 } = {}) => jfetch(srv.baseURL + '/chat/completions', {
  body: { model: 'm', temperature: 0, max_tokens: max, messages, ...(sid ? { session_id: sid } : {}) },
});
const replyOf = (r) => r.json.choices[0].message.content;
const withReply = (messages, reply) => [...messages, { role: 'assistant', content: reply }];

const getMetrics = async (srv) => {
  const r = await jfetch(srv.url + '/metrics', { method: 'GET' });
  assert.equal(r.status, 200, r.text);
  return r.text;
};
/* No sanitizer report in a server's log (the ASan build aborts or prints). */
const assertCleanLog = (srv, what) => {
  assert.doesNotMatch(srv.log(), /AddressSanitizer|LeakSanitizer|runtime error:/,
    `${what}: sanitizer report in the server log:\n${srv.log().slice(-4000)}`);
};
/* Run fn over items with at most `conc` in flight. */
async function pool(items, conc, fn) {
  let next = 0;
  await Promise.all(Array.from({ length: Math.min(conc, items.length) }, async () => {
    while (next < items.length) {
      const i = next++;
      await fn(items[i], i);
    }
  }));
}
const isNetErr = (e) => !(e instanceof assert.AssertionError);
const flipBit = (file, off, mask = 0x01) => {
  const b = fs.readFileSync(file);
  assert.ok(off >= 0 && off < b.length, `flip at ${off} outside ${file} (${b.length} bytes)`);
  b[off] ^= mask;
  fs.writeFileSync(file, b);
};

/* A session record DIR/sessions/ID.kvpm (format in storage/store.c): where its
 * parts are, and the object files (hex keys) its manifest lists. */
function parseRecord(file) {
  const b = fs.readFileSync(file);
  assert.equal(b.subarray(0, 8).toString('latin1'), 'KVPKSREC', `${file}: not a session record`);
  const M = b.readUInt32LE(16);
  const X = b.readUInt32LE(20);
  assert.equal(b.length, 64 + M + X, `${file}: size`);
  const man = 64;
  assert.equal(b.subarray(man, man + 8).toString('latin1'), 'KVPKMAN1');
  const nt = b.readUInt32LE(man + 112);
  const ns = b.readUInt32LE(man + 116);
  const spans = [];
  for (let i = 0; i < ns; i++) {
    const p = man + 128 + 4 * nt + 32 * i;
    const hi = b.readBigUInt64LE(p + 16).toString(16).padStart(16, '0');
    const lo = b.readBigUInt64LE(p + 24).toString(16).padStart(16, '0');
    spans.push(hi + lo);
  }
  return { len: b.length, M, X, nt, ns, spans };
}
const objectPath = (dir, hex) => path.join(dir, 'objects', hex.slice(0, 2), `${hex}.kvo`);
const quarantined = (dir) => (fs.existsSync(path.join(dir, 'quarantine')) ? fs.readdirSync(path.join(dir, 'quarantine')) : []);

/* ---- disk-full setup (test 2): a tmpfs if we may mount one --------------- */

const DISK = (() => {
  const dir = tmpDir('full');
  if (process.env.KVPARK_FAULT_NO_TMPFS !== '1' && process.getuid && process.getuid() === 0) {
    try {
      execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', dir], { stdio: 'ignore' });
      const umount = () => {
        try { execFileSync('umount', [dir], { stdio: 'ignore' }); } catch {
          try { execFileSync('umount', ['-l', dir], { stdio: 'ignore' }); } catch { /* give up */ }
        }
        try { fs.rmdirSync(dir); } catch { /* busy or gone */ }
      };
      process.on('exit', umount);
      return { mode: 'tmpfs', dir, cleanup: umount };
    } catch { /* not allowed: fall back */ }
  }
  return { mode: 'ulimit', dir, cleanup: () => fs.rmSync(dir, { recursive: true, force: true }) };
})();

/* ---- the tests ---------------------------------------------------------- */

describe('faults', { timeout: 560000 }, () => {
  let ref;
  const refCache = new Map();
  /* What the never-parked reference answers for this history (cached). */
  const refAnswer = (messages, max = 10) => {
    const key = JSON.stringify([messages, max]);
    if (!refCache.has(key)) {
      refCache.set(key, chatReq(ref, messages, { max }).then((r) => {
        assert.equal(r.status, 200, `reference: ${r.text}`);
        return replyOf(r);
      }));
    }
    return refCache.get(key);
  };

  before(async () => {
    console.log(`# faults: seed ${SEED} (replay with KVPARK_FAULT_SEED=${SEED}); disk-full variant: ${DISK.mode}`);
    ref = await startServer({ args: ['-c', '512'] });
  });
  after(async () => {
    await ref?.stop();
    DISK.cleanup();
  });

  it(`kill -9 at random moments while parking and saving (${KILLS} times, seed ${SEED}): ` +
     'acknowledged saves restore and continue identically', { timeout: 200000 }, async (t) => {
    const rng = mulberry32(SEED);
    const dir = tmpDir('kill');
    const args = ['-c', '512', '--hot-sessions', '1', '--idle-park', '0.05', '--cold-dir', dir];
    const W = 3;            /* sessions worked on at once (one client each) */
    const MAX_TURNS = 6;    /* then the session is deleted and a new one started */
    /* slots[i]: { id, hist, turns, acked: null | { tokens }, deleting } */
    const slots = new Array(W).fill(null);
    const deleted = new Set();
    const st = { verified: 0, chats: 0, saves: 0, deletes: 0, lost: 0, torn: 0, modes: {} };
    const t0 = Date.now();
    /* how slow this binary is (ASan): scales the random kill window */
    const c0 = Date.now();
    await refAnswer([{ role: 'user', content: PROMPTS[0] }]);
    const chatMs = Math.max(5, Date.now() - c0);

    try {
      let prevLog = ''; /* the killed server's log, to explain a failure */
      const about = (id) => `\n--- lines about ${id} in the killed server's log ---\n` +
        prevLog.split('\n').filter((l) => l.includes(id)).slice(-40).join('\n');
      for (let iter = 0; iter <= KILLS; iter++) {
        const srv = await startServer({ args });
        const where = `iteration ${iter} (seed ${SEED})`;
        try {
          /* ---- after the restart: every acknowledged session is back ---- */
          const m = await getMetrics(srv);
          assert.equal(metricValue(m, 'kvpark_store_events', { event: 'quarantined' }), 0,
            `${where}: a kill -9 left a damaged file (quarantined):\n${srv.log().slice(-3000)}`);
          st.torn += metricValue(m, 'kvpark_store_events', { event: 'torn_write_removed' });
          const listed = await listSessions(srv);
          const known = new Set(slots.filter(Boolean).map((s) => s.id));
          for (const id of Object.keys(listed)) {
            assert.ok(known.has(id), `${where}: session ${id} is listed but ${deleted.has(id)
              ? 'its DELETE was acknowledged' : 'was never known to the client'}`);
          }
          for (let i = 0; i < W; i++) {
            const s = slots[i];
            if (!s) continue;
            const e = listed[s.id];
            if (s.acked && !s.deleting) {
              assert.ok(e, `${where}: session ${s.id} was saved (acknowledged, ${s.acked.tokens} tokens) ` +
                `but is not listed after kill -9:\n${srv.log().slice(-3000)}${about(s.id)}`);
              assert.ok(e.tokens >= s.acked.tokens, `${where}: session ${s.id} holds ${e.tokens} tokens, ` +
                `its acknowledged save had ${s.acked.tokens}${about(s.id)}`);
            }
            if (!e) { slots[i] = null; st.lost++; continue; } /* never acknowledged: may be lost */
            s.deleting = false;
            const rs = await jfetch(srv.url + `/v1/sessions/${s.id}/restore`, {});
            assert.equal(rs.status, 200, `${where}: restore ${s.id}: ${rs.text}`);
            assert.equal(rs.json.tokens, e.tokens, `${where}: restored tokens vs listed`);
            const messages = [...s.hist, { role: 'user', content: pick(rng, USERS) }];
            const r = await chatReq(srv, messages, { sid: s.id });
            assert.equal(r.status, 200, `${where}: next turn of ${s.id}: ${r.text}`);
            const want = await refAnswer(messages);
            assert.equal(replyOf(r), want, `${where}: session ${s.id} (${messages.length} messages, ` +
              `${e.tokens} tokens restored) continues differently from the reference`);
            assert.ok(r.json.usage.prompt_tokens_details?.cached_tokens > 0,
              `${where}: the restored KV of ${s.id} was not reused: ${JSON.stringify(r.json.usage)}`);
            s.hist = withReply(messages, replyOf(r));
            s.turns++;
            st.verified++;
          }
          if (iter === KILLS) { /* the last restart only checks */
            const ex = await srv.stop();
            assert.ok(!ex.killed, 'the last server did not stop on SIGTERM');
            assertCleanLog(srv, where);
            break;
          }

          /* ---- the workload, and a kill -9 at a random moment ---- */
          const mode = pick(rng, ['time', 'save', 'park']);
          st.modes[mode] = (st.modes[mode] || 0) + 1;
          let killed = false;
          const timers = [];
          const kill = () => { if (!killed) { killed = true; try { srv.proc.kill('SIGKILL'); } catch { /* gone */ } } };
          const later = (ms) => timers.push(setTimeout(kill, ms));
          const target = 1 + Math.floor(rng() * 3);
          let nSaves = 0;
          let nChats = 0;
          if (mode === 'time') later(5 + rng() * 40 * chatMs);
          later(3000 + 200 * chatMs); /* whatever happens, this iteration ends */
          const done = []; /* [messages, reply] to compare with the reference */

          const worker = async (i) => {
            while (!killed) {
              try {
                let s = slots[i];
                if (s && s.turns >= MAX_TURNS) {
                  s.deleting = true;
                  const d = await jfetch(srv.url + `/v1/sessions/${s.id}`, { method: 'DELETE' });
                  assert.equal(d.status, 200, `DELETE ${s.id}: ${d.text}`);
                  deleted.add(s.id);
                  slots[i] = s = null;
                  st.deletes++;
                }
                if (!s) {
                  const r = await jfetch(srv.url + '/v1/sessions', { body: {} });
                  assert.equal(r.status, 200, r.text);
                  slots[i] = s = { id: r.json.id, hist: [], turns: 0, acked: null, deleting: false };
                }
                const a = rng();
                if (s.turns === 0 || a < 0.55) {
                  const messages = [...s.hist, { role: 'user', content: s.turns ? pick(rng, USERS) : pick(rng, PROMPTS) }];
                  const r = await chatReq(srv, messages, { sid: s.id });
                  assert.equal(r.status, 200, `chat in ${s.id}: ${r.text}`);
                  done.push([messages, replyOf(r), s.id]);
                  s.hist = withReply(messages, replyOf(r));
                  s.turns++;
                  st.chats++;
                  if (mode === 'park' && ++nChats === target) later(40 + rng() * 60); /* around the idle park */
                } else if (a < 0.85) {
                  const p = jfetch(srv.url + `/v1/sessions/${s.id}/save`, {});
                  if (mode === 'save' && ++nSaves === target) later(rng() * 4 * chatMs); /* while saving */
                  const r = await p;
                  assert.equal(r.status, 200, `save ${s.id}: ${r.text}`);
                  assert.ok(r.json.tokens > 0, r.text);
                  s.acked = { tokens: r.json.tokens };
                  st.saves++;
                } else {
                  await sleep(rng() * 80);
                }
              } catch (e) {
                if (isNetErr(e) && killed) return; /* the kill cut the request: nothing was acknowledged */
                throw e;
              }
            }
          };
          try {
            await Promise.all(slots.map((_, i) => worker(i)));
          } finally {
            for (const tm of timers) clearTimeout(tm);
            kill();
            await killServer(srv);
          }
          assertCleanLog(srv, where);
          prevLog = srv.log();
          /* everything answered while the server lived was right too */
          for (const [messages, reply, sid] of done) {
            assert.equal(reply, await refAnswer(messages), `${where}: a turn in ${sid} (${messages.length} messages) ` +
              'differs from the reference');
          }
        } finally {
          await killServer(srv); /* no-op when it is gone already */
        }
      }
      const secs = ((Date.now() - t0) / 1000).toFixed(1);
      const line = `kill -9 x${KILLS} in ${secs} s: ${st.chats} chats, ${st.saves} acknowledged saves, ` +
        `${st.deletes} deletes, ${st.verified} sessions verified after restarts, ${st.lost} unsaved ones lost, ` +
        `${st.torn} torn writes cleaned up at restart, ` +
        `kill moments ${JSON.stringify(st.modes)}`;
      console.log(`# ${line}`);
      t.diagnostic(line);
      assert.ok(st.saves >= KILLS / 2, `too few acknowledged saves to mean anything: ${line}`);
      assert.ok(st.verified >= KILLS / 2, `too few sessions verified after a kill: ${line}`);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it(`disk full while parking (${DISK.mode === 'tmpfs' ? 'a 4 MiB tmpfs as --cold-dir'
    : 'file-size limit: ulimit -f, no tmpfs mountable'}): the server keeps serving, reports it, ` +
     'the session stays in its tier and continues', { timeout: 120000 }, async (t) => {
    t.diagnostic(`disk-full variant: ${DISK.mode}`);
    const dir = DISK.dir;
    const args = ['-c', '256', '--idle-park', '0.2', '--warm-budget', '1', '--cold-dir', dir];
    let srv = await startServer({ args });
    const filler = path.join(dir, 'filler.bin');
    try {
      /* A: one turn, saved while there is room */
      const a = await newSession(srv);
      let histA = [{ role: 'user', content: PROMPTS[1] }];
      let r = await chatReq(srv, histA, { sid: a });
      assert.equal(r.status, 200, r.text);
      assert.equal(replyOf(r), await refAnswer(histA));
      histA = withReply(histA, replyOf(r));
      const s1 = await jfetch(srv.url + `/v1/sessions/${a}/save`, {});
      assert.equal(s1.status, 200, s1.text);

      /* the disk fills up */
      if (DISK.mode === 'tmpfs') {
        const fd = fs.openSync(filler, 'w');
        try {
          for (const sz of [65536, 4096, 512, 1]) {
            const buf = Buffer.alloc(sz, 0x55);
            for (;;) {
              try { fs.writeSync(fd, buf); } catch (e) { if (e.code === 'ENOSPC') break; throw e; }
            }
          }
        } finally { fs.closeSync(fd); }
      } else {
        /* no tmpfs: restart under a 1 KiB file-size limit (records fit, objects do not) */
        const ex = await srv.stop();
        assert.ok(!ex.killed);
        srv = await startServerWrapped(['bash', '-c', 'ulimit -f 1; exec "$0" "$@"'], { args });
      }
      const logBefore = srv.log().length;

      /* A grows; its durable park fails: it stays hot and the failure is reported */
      histA = [...histA, { role: 'user', content: USERS[0] }];
      r = await chatReq(srv, histA, { sid: a });
      assert.equal(r.status, 200, r.text);
      assert.equal(replyOf(r), await refAnswer(histA));
      histA = withReply(histA, replyOf(r));
      const m = await waitFor('the failed park in /metrics', async () => {
        const txt = await getMetrics(srv);
        return metricValue(txt, 'kvpark_session_events_total', { event: 'error' }) > 0 ? txt : null;
      });
      const ioErrors = metricValue(m, 'kvpark_store_events', { event: 'io_error' });
      assert.ok(ioErrors > 0, `kvpark_store_events{event="io_error"} is ${ioErrors} after a failed write:\n${m}`);
      const log = srv.log().slice(logBefore);
      assert.match(log, /park(ing)? session .* failed|No space left|File too large/i, `no log line:\n${log}`);
      assert.match(log, new RegExp(a), 'the log line names the session');
      let tiers = await listSessions(srv);
      assert.equal(tiers[a].tier, 'hot', `A must stay hot when its park fails: ${JSON.stringify(tiers[a])}`);

      /* an explicit save answers a 5xx in the OpenAI error shape */
      const s2 = await jfetch(srv.url + `/v1/sessions/${a}/save`, {});
      assert.ok(s2.status >= 500 && s2.status < 600, `save on a full disk: ${s2.status} ${s2.text}`);
      assertErrorShape(assert, s2.json, { type: 'server_error' });
      assert.match(s2.json.error.message, new RegExp(a), 'the error names the session');
      tiers = await listSessions(srv);
      assert.equal(tiers[a].tier, 'hot', 'A stays hot after a failed save');

      /* the server keeps serving: stateless chats, new sessions; B parks to RAM and stays there */
      const g = await chatReq(srv, [{ role: 'user', content: ONCE }], { max: 16 });
      assert.equal(g.status, 200, g.text);
      assert.ok(GOLDEN[ONCE].startsWith(replyOf(g)), replyOf(g));
      const b = await newSession(srv);
      let histB = [{ role: 'user', content: PROMPTS[2] }];
      r = await chatReq(srv, histB, { sid: b });
      assert.equal(r.status, 200, r.text);
      histB = withReply(histB, replyOf(r));
      await waitFor('B parked (its spill to disk fails, it stays in RAM)', async () => (await listSessions(srv))[b].tier !== 'hot');
      tiers = await listSessions(srv);
      assert.equal(tiers[b].tier, 'warm', `B cannot reach the full disk: it stays warm: ${JSON.stringify(tiers[b])}`);

      /* both continue correctly while the disk is still full */
      for (const [sid, h] of [[a, histA], [b, histB]]) {
        const msgs = [...h, { role: 'user', content: USERS[1] }];
        r = await chatReq(srv, msgs, { sid });
        assert.equal(r.status, 200, r.text);
        assert.equal(replyOf(r), await refAnswer(msgs), `session ${sid} after the disk filled up`);
        if (sid === a) histA = withReply(msgs, replyOf(r));
      }
      assert.equal((await jfetch(srv.url + '/health', { method: 'GET' })).status, 200);

      /* room again: A saves, and survives a restart */
      if (DISK.mode === 'tmpfs') {
        fs.rmSync(filler);
      } else {
        const ex = await srv.stop(); /* its shutdown park of A fails (logged); the acknowledged save stays */
        assert.ok(!ex.killed);
        assertCleanLog(srv, 'ulimit server');
        srv = await startServer({ args });
      }
      const s3 = await jfetch(srv.url + `/v1/sessions/${a}/save`, {});
      assert.equal(s3.status, 200, `save once there is room: ${s3.text}`);
      const ex = await srv.stop();
      assert.ok(!ex.killed);
      assertCleanLog(srv, 'disk-full server');
      srv = await startServer({ args });
      tiers = await listSessions(srv);
      assert.ok(tiers[a], `A lost over the restart: ${JSON.stringify(tiers)}`);
      const msgs = [...histA, { role: 'user', content: USERS[2] }];
      r = await chatReq(srv, msgs, { sid: a });
      assert.equal(r.status, 200, r.text);
      assert.equal(replyOf(r), await refAnswer(msgs), 'A after the restart');
    } finally {
      await srv.stop();
      assertCleanLog(srv, 'disk-full server');
      fs.rmSync(filler, { force: true });
    }
  });

  it('flipped bits and truncation in every part of session records and in objects: quarantined; ' +
     'a damaged record is gone, damaged objects are recomputed from the token ids; nothing else is harmed',
     { timeout: 120000 }, async () => {
    const dir = tmpDir('corrupt');
    const args = ['-c', '256', '--cold-dir', dir];
    let srv = await startServer({ args });
    try {
      /* record damage: [name, (len, M, nt) -> byte to flip | {trunc} | {append}] */
      const RECORD = [
        ['header magic', () => 0],
        ['header version', () => 8],
        ['header manifest length', () => 16],
        ['header n_tokens', () => 24],
        ['header mtime', () => 35],
        ['header extra checksum', () => 44],
        ['header checksum', () => 60],
        ['manifest magic', () => 64],
        ['manifest n_tokens', () => 64 + 112],
        ['manifest token id', () => 64 + 128 + 4 * 2],
        ['manifest span key', (_, M, nt) => 64 + 128 + 4 * nt + 20],
        ['manifest checksum', (_, M) => 64 + M - 3],
        ['extra bytes (owner)', (_, M) => 64 + M + 6],
        ['truncated to 0 bytes', () => ({ trunc: 0 })],
        ['truncated in the header', () => ({ trunc: 40 })],
        ['truncated in the manifest', (_, M) => ({ trunc: 64 + Math.floor(M / 2) })],
        ['truncated by its last byte', (len) => ({ trunc: len - 1 })],
        ['one byte appended', () => ({ append: true })],
      ];
      /* object damage found at restart (the session goes with it) */
      const OBJECT = [
        ['object header key', (len) => 20],
        ['object payload length', () => 33],
        ['object truncated by one byte', (len) => ({ trunc: len - 1 })],
        ['object file deleted', () => ({ unlink: true })],
      ];
      const N_INTACT = 5;
      /* the first session also creates the objects every session shares (the
       * chat template's first tokens), so the others' new objects are their own */
      const names = ['warm-up', ...RECORD.map((d) => d[0]), ...OBJECT.map((d) => d[0]),
        'object payload (before restart)', ...Array.from({ length: N_INTACT }, (_, i) => `intact ${i}`)];
      const S = {};
      for (let i = 0; i < names.length; i++) {
        const id = await newSession(srv);
        const hist = [{ role: 'user', content: PROMPTS[i % PROMPTS.length] + (i >= PROMPTS.length ? ' again' : '') }];
        const r = await chatReq(srv, hist, { sid: id, max: 12 });
        assert.equal(r.status, 200, r.text);
        const sv = await jfetch(srv.url + `/v1/sessions/${id}/save`, {});
        assert.equal(sv.status, 200, sv.text);
        S[names[i]] = { id, hist: withReply(hist, replyOf(r)), tokens: sv.json.tokens };
      }
      const ex = await srv.stop();
      assert.ok(!ex.killed);
      assertCleanLog(srv, 'corruption: first server');

      /* which objects belong to one session only */
      const recFile = (id) => path.join(dir, 'sessions', `${id}.kvpm`);
      const refs = new Map();
      for (const s of Object.values(S)) {
        s.rec = parseRecord(recFile(s.id));
        for (const h of s.rec.spans) refs.set(h, (refs.get(h) || 0) + 1);
      }
      const ownObject = (s) => {
        const h = [...s.rec.spans].reverse().find((k) => refs.get(k) === 1);
        assert.ok(h, `session ${s.id} has no object of its own: ${s.rec.spans}`);
        assert.ok(fs.existsSync(objectPath(dir, h)), `object ${h} missing`);
        return h;
      };
      const damage = (file, how) => {
        if (typeof how === 'number') flipBit(file, how);
        else if (how.trunc !== undefined) fs.truncateSync(file, how.trunc);
        else if (how.append) fs.appendFileSync(file, Buffer.from([0]));
        else if (how.unlink) fs.unlinkSync(file);
      };
      for (const [name, at] of RECORD) {
        const s = S[name];
        damage(recFile(s.id), at(s.rec.len, s.rec.M, s.rec.nt));
      }
      for (const [name, at] of OBJECT) {
        const s = S[name];
        s.obj = ownObject(s);
        const f = objectPath(dir, s.obj);
        damage(f, at(fs.statSync(f).size));
      }
      const lazy = S['object payload (before restart)'];
      lazy.obj = ownObject(lazy);
      const lazyFile = objectPath(dir, lazy.obj);
      flipBit(lazyFile, 56 + Math.floor((fs.statSync(lazyFile).size - 56) / 2));

      /* restart: the damage is found, moved aside, counted, logged */
      srv = await startServer({ args });
      const m = await getMetrics(srv);
      const nQ = metricValue(m, 'kvpark_store_events', { event: 'quarantined' });
      const wantQ = RECORD.length + 2 * (OBJECT.length - 1) + 1;
      assert.ok(nQ >= wantQ, `kvpark_store_events{event="quarantined"} = ${nQ}, want >= ${wantQ}\n${srv.log().slice(-4000)}`);
      const q = quarantined(dir);
      const listed = await listSessions(srv);
      for (const [name] of RECORD) { /* its token ids are unreadable: gone */
        const s = S[name];
        assert.ok(!listed[s.id], `damage "${name}": session ${s.id} still listed`);
        assert.ok(q.some((f) => f.startsWith(`${s.id}.kvpm`)), `damage "${name}": its record is not in quarantine: ${q}`);
        assert.match(srv.log(), new RegExp(s.id), `damage "${name}": not logged`);
        const r = await chatReq(srv, [...s.hist, { role: 'user', content: USERS[0] }], { sid: s.id });
        assert.equal(r.status, 404, `damage "${name}": a request on it: ${r.status} ${r.text}`);
      }
      /* its KV is lost, its token ids are not: recomputed by the next request */
      const recomputedAnswer = async (s, what, user) => {
        const msgs = [...s.hist, { role: 'user', content: user }];
        const r = await chatReq(srv, msgs, { sid: s.id });
        assert.equal(r.status, 200, `${what}: ${r.status} ${r.text}`);
        assert.equal(replyOf(r), await refAnswer(msgs), `${what}: the recomputed session answers like the reference`);
        assert.equal(r.json.usage.prompt_tokens_details?.cached_tokens ?? 0, 0, `${what}: recomputed, not restored`);
        s.hist = withReply(msgs, replyOf(r));
        return r;
      };
      let nRecomputed = 0;
      for (const [name] of OBJECT) {
        const s = S[name];
        assert.ok(listed[s.id], `damage "${name}": session ${s.id} not listed: its token ids were lost`);
        assert.equal(listed[s.id].tokens, s.tokens, `damage "${name}": its tokens`);
        assert.ok(q.some((f) => f.startsWith(`${s.id}.kvpm`)), `damage "${name}": its record is not in quarantine: ${q}`);
        assert.match(srv.log(), new RegExp(`'${s.id}'.*KV is lost`), `damage "${name}": not logged`);
        await recomputedAnswer(s, `damage "${name}"`, USERS[0]);
        nRecomputed++;
      }
      for (const [name] of OBJECT.slice(0, 3)) {
        assert.ok(q.some((f) => f.startsWith(S[name].obj)), `damage "${name}": object not in quarantine: ${q}`);
      }
      {
        const m1 = await getMetrics(srv);
        assert.ok(metricValue(m1, 'kvpark_session_events_total', { event: 'recomputed', tier: 'cold' }) >= nRecomputed,
          'each recompute is counted');
        assert.ok(metricValue(m1, 'kvpark_store_events', { event: 'kv_lost' }) >= OBJECT.length, 'each lost KV is counted');
      }

      /* intact sessions: listed with their tokens; two of them are corrupted now, while the server runs */
      const intact = Array.from({ length: N_INTACT }, (_, i) => S[`intact ${i}`]);
      for (const s of [S['warm-up'], ...intact]) {
        assert.ok(listed[s.id], `intact session ${s.id} lost:\n${srv.log().slice(-3000)}`);
        assert.equal(listed[s.id].tokens, s.tokens);
        assert.equal(listed[s.id].tier, 'cold');
      }
      const [live1, live2, ...rest] = intact;
      for (const s of [live1, live2]) {
        s.obj = ownObject(s);
        const f = objectPath(dir, s.obj);
        flipBit(f, 56 + Math.floor((fs.statSync(f).size - 56) / 3), 0x80);
      }
      /* the one damaged before the restart: payloads are checked when read */
      if (listed[lazy.id]) {
        await recomputedAnswer(lazy, 'payload damaged before the restart', USERS[0]);
        nRecomputed++;
      }
      await recomputedAnswer(live1, 'object corrupted while running (chat)', USERS[1]);
      nRecomputed++;
      const rs = await jfetch(srv.url + `/v1/sessions/${live2.id}/restore`, {});
      assert.equal(rs.status, 200, `object corrupted while running (restore): ${rs.text}`);
      assert.equal(rs.json.from_tier, 'recomputed');
      assert.equal(rs.json.tokens, live2.tokens);
      nRecomputed++;
      await recomputedAnswer(live2, 'object corrupted while running (then chat)', USERS[1]);
      for (const s of [lazy, live1, live2]) {
        const g = await jfetch(srv.url + `/v1/sessions/${s.id}`, { method: 'GET' });
        assert.equal(g.status, 200, `a session whose KV was lost is kept: ${g.text}`);
        assert.ok(quarantined(dir).some((f) => f.startsWith(s.obj)), `object ${s.obj} of ${s.id} not in quarantine`);
      }
      /* hot now, and whole again: the next turn reuses the recomputed KV */
      {
        const msgs = [...live1.hist, { role: 'user', content: USERS[2] }];
        const r = await chatReq(srv, msgs, { sid: live1.id });
        assert.equal(r.status, 200, r.text);
        assert.equal(replyOf(r), await refAnswer(msgs), 'after the recompute');
        assert.ok(r.json.usage.prompt_tokens_details?.cached_tokens > 0, 'the recomputed KV is reused');
      }
      const m2 = await getMetrics(srv);
      assert.ok(metricValue(m2, 'kvpark_store_events', { event: 'quarantined' }) > nQ, 'the corrupt objects found at restore are counted');
      const nRec = ['warm', 'cold'].reduce((a, tier) => a + metricValue(m2, 'kvpark_session_events_total', { event: 'recomputed', tier }), 0);
      assert.ok(nRec >= nRecomputed, `kvpark_session_events_total{event="recomputed"} = ${nRec}, want >= ${nRecomputed}`);

      /* nobody else is harmed: every other session continues exactly like the reference */
      await Promise.all([S['warm-up'], ...rest].map(async (s) => {
        const msgs = [...s.hist, { role: 'user', content: USERS[2] }];
        const r = await chatReq(srv, msgs, { sid: s.id });
        assert.equal(r.status, 200, r.text);
        assert.equal(replyOf(r), await refAnswer(msgs), `intact session ${s.id}`);
        assert.ok(r.json.usage.prompt_tokens_details?.cached_tokens > 0, 'restored, not re-prefilled');
      }));
      const g = await chatReq(srv, [{ role: 'user', content: ONCE }], { max: 16 });
      assert.equal(g.status, 200);
      assert.ok(GOLDEN[ONCE].startsWith(replyOf(g)));
      const ex2 = await srv.stop();
      assert.ok(!ex2.killed);
      assertCleanLog(srv, 'corruption: second server');
    } finally {
      await srv.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('200 sessions parked and restored concurrently with live traffic: every continuation correct, no 5xx',
    { timeout: 200000 }, async (t) => {
      const dir = tmpDir('many');
      const srv = await startServer({
        args: ['-c', '256', '--max-sessions', '300', '--hot-sessions', '8', '--warm-budget', '256K',
          '--idle-park', '0.3', '--cold-dir', dir],
      });
      const rng = mulberry32(SEED ^ 0x9e3779b9);
      const N = 200;
      const CONC = 12;
      const t0 = Date.now();
      const statuses = new Map();
      const count = (s) => statuses.set(s, (statuses.get(s) || 0) + 1);
      try {
        const sess = [];
        await pool(Array.from({ length: N }, (_, i) => i), CONC, async (i) => {
          sess[i] = { i, id: await newSession(srv), hist: [] };
        });

        /* live traffic the whole time: stateless chats, listings, scrapes */
        let stop = false;
        let nLive = 0;
        const liveLoop = async (fn) => { while (!stop) { await fn(); nLive++; } };
        const live = Promise.all([
          liveLoop(async () => {
            const r = await chatReq(srv, [{ role: 'user', content: ONCE }], { max: 12 });
            count(r.status);
            assert.equal(r.status, 200, r.text);
            assert.ok(GOLDEN[ONCE].startsWith(replyOf(r)), `live traffic: ${replyOf(r)}`);
          }),
          liveLoop(async () => {
            const r = await jfetch(srv.url + '/v1/sessions', { method: 'GET' });
            count(r.status);
            assert.equal(r.status, 200, r.text);
            await sleep(20);
          }),
          liveLoop(async () => {
            const r = await jfetch(srv.url + '/metrics', { method: 'GET' });
            count(r.status);
            assert.equal(r.status, 200);
            await sleep(50);
          }),
        ]);

        let saves = 0;
        let restores = 0;
        try {
          for (let turn = 0; turn < 3; turn++) {
            const order = sess.map((s) => s.i).sort(() => rng() - 0.5);
            await pool(order, CONC, async (i) => {
              const s = sess[i];
              if (turn > 0 && i % 7 === 3) {
                const r = await jfetch(srv.url + `/v1/sessions/${s.id}/restore`, {});
                count(r.status);
                assert.equal(r.status, 200, r.text);
                restores++;
              }
              const msgs = [...s.hist, { role: 'user', content: turn ? USERS[(i + turn) % 3] : PROMPTS[i % 20] }];
              const r = await chatReq(srv, msgs, { sid: s.id, max: 8 });
              count(r.status);
              assert.equal(r.status, 200, `session ${i} turn ${turn}: ${r.text}`);
              assert.equal(replyOf(r), await refAnswer(msgs, 8), `session ${i} (${s.id}) turn ${turn}`);
              if (turn > 0) {
                assert.ok(r.json.usage.prompt_tokens_details?.cached_tokens > 0,
                  `session ${i} turn ${turn}: its parked KV was not reused: ${JSON.stringify(r.json.usage)}`);
              }
              s.hist = withReply(msgs, replyOf(r));
              if (turn === 1 && i % 5 === 0) {
                const sv = await jfetch(srv.url + `/v1/sessions/${s.id}/save`, {});
                count(sv.status);
                assert.equal(sv.status, 200, sv.text);
                saves++;
              }
            });
          }
        } finally {
          stop = true;
          await live;
        }
        const m = await getMetrics(srv);
        const parks = metricValue(m, 'kvpark_session_events_total', { event: 'park' });
        const restored = metricValue(m, 'kvpark_session_events_total', { event: 'restore' });
        const errors = metricValue(m, 'kvpark_session_events_total', { event: 'error' });
        const fromCold = metricValue(m, 'kvpark_session_events_total', { event: 'restore', tier: 'cold' });
        const line = `${N} sessions x 3 turns in ${((Date.now() - t0) / 1000).toFixed(1)} s: ${parks} parks, ` +
          `${restored} restores (${fromCold} from disk), ${saves} saves, ${restores} explicit restores, ` +
          `${nLive} live requests; statuses ${JSON.stringify(Object.fromEntries(statuses))}`;
        console.log(`# ${line}`);
        t.diagnostic(line);
        assert.equal(errors, 0, `session errors: ${line}`);
        assert.ok(restored >= 2 * (N - 8 - CONC), `too few restores: ${line}`);
        assert.ok(fromCold > 0, `no restore from disk: ${line}`);
        assert.ok(![...statuses.keys()].some((s) => s >= 500), `5xx answers: ${line}`);
        const ex = await srv.stop();
        assert.ok(!ex.killed);
        assertCleanLog(srv, '200 sessions');
      } finally {
        await srv.stop();
        fs.rmSync(dir, { recursive: true, force: true });
      }
    });
});
