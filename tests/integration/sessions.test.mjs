/*
 * sessions.test.mjs — parked conversations end to end: create a session,
 * chat in it, save it, restart the server on the same --session-dir, restore
 * it, and check the next turn is exactly what a server that never restarted
 * answers (greedy). Also: session ids in body and header, the sessions API
 * shapes, and that a session belongs to the API key that created it (another
 * key gets 404, even after the restart).
 * Limits and lifetime: --max-sessions-per-key (key A at its limit does not
 * block key B), --session-ttl (an idle session is deleted from every tier,
 * logged and counted; a used one stays), a restart with more stored sessions
 * than --max-sessions keeps every one (new ones are refused until under the
 * cap), a save on a full disk answers 507 with the reason.
 * Owner ids on disk: keyed with the store's secret (DIR/owner.secret, 0600),
 * and a session stored by an older version (unkeyed id) is still its key's
 * after the upgrade, its record rewritten keyed.
 *
 * Why: surviving a restart with the conversation intact is kvpark's reason to
 * exist; owner isolation keeps one tenant out of another's conversation.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { after, before, describe, it } from 'node:test';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import {
  BIN, GOLDEN, MODEL, ONCE, assertErrorShape, jfetch, metricValue, newSession, sleep, startServer, startServerWrapped, tmpDir,
  waitFor,
} from './helpers.mjs';

const KA = 'key-tenant-a';
const KB = 'key-tenant-b';
const hA = { authorization: `Bearer ${KA}` };
const hB = { authorization: `Bearer ${KB}` };

const TURN2_USER = 'What did Lily do next?';
const turn1Body = (sid) => ({
  model: 'm', temperature: 0, max_tokens: 24, session_id: sid,
  messages: [{ role: 'user', content: ONCE }],
});
const turn2Body = (reply1) => ({
  model: 'm', temperature: 0, max_tokens: 24,
  messages: [{ role: 'user', content: ONCE }, { role: 'assistant', content: reply1 },
    { role: 'user', content: TURN2_USER }],
});

describe('sessions', { timeout: 110000 }, () => {
  let dirA;
  let dirB;
  let a; /* the server that is restarted */
  let b; /* the reference server that never restarts */
  const args = (dir) => ['-c', '512', '--api-key', KA, '--api-key', KB, '--session-dir', dir];

  before(async () => {
    dirA = tmpDir('sessA');
    dirB = tmpDir('sessB');
    [a, b] = await Promise.all([startServer({ args: args(dirA) }), startServer({ args: args(dirB) })]);
  });
  after(async () => {
    await Promise.all([a?.stop(), b?.stop()]);
    for (const d of [dirA, dirB]) if (d) fs.rmSync(d, { recursive: true, force: true });
  });

  const createSession = async (srv, h) => {
    const r = await jfetch(srv.url + '/v1/sessions', { body: {}, headers: h });
    assert.equal(r.status, 200, r.text);
    assert.equal(r.json.object, 'session');
    assert.match(r.json.id, /^[A-Za-z0-9_-]{16,64}$/, 'an unguessable id');
    return r.json.id;
  };

  let sidA;
  let sidB;
  let reply1;
  let tokensBeforeSave;

  it('create + chat in a session: id echoed in body and X-Session-Id', async () => {
    sidA = await createSession(a, hA);
    sidB = await createSession(b, hA);
    assert.notEqual(sidA, sidB);
    const ra = await jfetch(a.baseURL + '/chat/completions', { body: turn1Body(sidA), headers: hA });
    assert.equal(ra.status, 200, ra.text);
    assert.equal(ra.json.session_id, sidA);
    assert.equal(ra.headers.get('x-session-id'), sidA);
    reply1 = ra.json.choices[0].message.content;
    assert.ok(GOLDEN[ONCE].startsWith(reply1) && reply1.length > 0, reply1);

    /* the reference names its session by header instead of body */
    const { session_id: _, ...noSid } = turn1Body(sidB);
    const rb = await jfetch(b.baseURL + '/chat/completions', { body: noSid, headers: { ...hA, 'x-session-id': sidB } });
    assert.equal(rb.status, 200, rb.text);
    assert.equal(rb.json.session_id, sidB);
    assert.equal(rb.headers.get('x-session-id'), sidB);
    assert.equal(rb.json.choices[0].message.content, reply1);
  });

  it('GET /v1/sessions and /v1/sessions/{id} describe it', async () => {
    const list = await jfetch(a.url + '/v1/sessions', { method: 'GET', headers: hA });
    assert.equal(list.status, 200, list.text);
    assert.equal(list.json.object, 'list');
    const e = list.json.data.find((s) => s.id === sidA);
    assert.ok(e, `session ${sidA} not listed: ${list.text}`);
    for (const k of ['tokens', 'bytes', 'last_used']) assert.equal(typeof e[k], 'number', `${k} in ${JSON.stringify(e)}`);
    assert.equal(typeof e.tier, 'string');
    assert.ok(e.tokens >= 5 + 24 - 1, `tokens ${e.tokens}: the turn's prompt and reply`);
    const one = await jfetch(a.url + `/v1/sessions/${sidA}`, { method: 'GET', headers: hA });
    assert.equal(one.status, 200, one.text);
    assert.equal(one.json.id, sidA);
    assert.equal(one.json.tokens, e.tokens);
    tokensBeforeSave = e.tokens;
  });

  it('save writes it to --session-dir', async () => {
    const r = await jfetch(a.url + `/v1/sessions/${sidA}/save`, { headers: hA });
    assert.equal(r.status, 200, r.text);
    assert.equal(r.json.id, sidA);
    assert.ok(r.json.bytes > 0, r.text);
    assert.equal(typeof r.json.ratio_vs_fp16, 'number');
    assert.ok(r.json.ratio_vs_fp16 > 0);
    assert.equal(typeof r.json.ms, 'number');
    const files = fs.readdirSync(dirA, { recursive: true });
    assert.ok(files.length > 0, 'nothing written under --session-dir');
  });

  it('SIGTERM stops the server within 5 s; it restarts on the same --session-dir', async () => {
    const ex = await a.stop();
    assert.ok(!ex.killed, `did not exit within 5 s of SIGTERM (log: ${a.log().slice(-500)})`);
    a = await startServer({ args: args(dirA) });
    const list = await jfetch(a.url + '/v1/sessions', { method: 'GET', headers: hA });
    assert.equal(list.status, 200, list.text);
    const e = list.json.data.find((s) => s.id === sidA);
    assert.ok(e, `session not re-indexed after restart: ${list.text}`);
    assert.equal(e.tokens, tokensBeforeSave);
  });

  it('another key cannot see or touch the session, even after the restart (404)', async () => {
    const listB = await jfetch(a.url + '/v1/sessions', { method: 'GET', headers: hB });
    assert.equal(listB.status, 200);
    assert.ok(!listB.json.data.some((s) => s.id === sidA), 'key B lists key A\'s session');
    for (const [method, p] of [['GET', `/v1/sessions/${sidA}`], ['POST', `/v1/sessions/${sidA}/save`],
      ['POST', `/v1/sessions/${sidA}/restore`], ['DELETE', `/v1/sessions/${sidA}`]]) {
      const r = await jfetch(a.url + p, { method, headers: hB });
      assert.equal(r.status, 404, `key B ${method} ${p}: ${r.status} ${r.text}`);
      assertErrorShape(assert, r.json);
    }
    const chat = await jfetch(a.baseURL + '/chat/completions', { body: { ...turn2Body(reply1), session_id: sidA }, headers: hB });
    assert.equal(chat.status, 404, chat.text);
    const hdr = await jfetch(a.baseURL + '/chat/completions', { body: turn2Body(reply1), headers: { ...hB, 'x-session-id': sidA } });
    assert.equal(hdr.status, 404, hdr.text);
    const nokey = await jfetch(a.url + `/v1/sessions/${sidA}`, { method: 'GET' });
    assert.equal(nokey.status, 401);
  });

  it('restore, then the next turn equals the never-restarted server (greedy)', async () => {
    const rs = await jfetch(a.url + `/v1/sessions/${sidA}/restore`, { headers: hA });
    assert.equal(rs.status, 200, rs.text);
    assert.equal(rs.json.id, sidA);
    assert.equal(typeof rs.json.ms, 'number');

    const ra = await jfetch(a.baseURL + '/chat/completions', { body: turn2Body(reply1), headers: { ...hA, 'x-session-id': sidA } });
    const rb = await jfetch(b.baseURL + '/chat/completions', { body: turn2Body(reply1), headers: { ...hA, 'x-session-id': sidB } });
    assert.equal(ra.status, 200, ra.text);
    assert.equal(rb.status, 200, rb.text);
    assert.equal(ra.json.session_id, sidA);
    assert.equal(ra.json.choices[0].message.content, rb.json.choices[0].message.content);
    assert.equal(ra.json.usage.prompt_tokens, rb.json.usage.prompt_tokens);
    const cached = ra.json.usage.prompt_tokens_details?.cached_tokens;
    assert.ok(cached > 0, `the restored session's KV was not reused: ${JSON.stringify(ra.json.usage)}`);
    assert.equal(cached, rb.json.usage.prompt_tokens_details?.cached_tokens,
      'restored and never-parked sessions reuse the same prefix');
  });

  it('a streamed turn in the session also matches', async () => {
    const body = { ...turn2Body(reply1), stream: true, max_tokens: 12 };
    body.messages = [...body.messages, { role: 'assistant', content: 'She' }, { role: 'user', content: 'And then?' }];
    const texts = [];
    for (const [srv, sid] of [[a, sidA], [b, sidB]]) {
      const r = await jfetch(srv.baseURL + '/chat/completions', { body, headers: { ...hA, 'x-session-id': sid } });
      assert.equal(r.status, 200, r.text);
      assert.equal(r.headers.get('x-session-id'), sid);
      const events = r.text.split('\n').filter((l) => l.startsWith('data: {')).map((l) => JSON.parse(l.slice(6)));
      texts.push(events.map((e) => e.choices[0]?.delta?.content ?? '').join(''));
    }
    assert.equal(texts[0], texts[1]);
  });

  it('concurrent requests on one session: each is served correctly (or refused), never mixed', async () => {
    const sid = await createSession(b, hA);
    const body = { model: 'm', temperature: 0, max_tokens: 64, session_id: sid, messages: [{ role: 'user', content: ONCE }] };
    const res = await Promise.all([0, 1, 2].map(() => jfetch(b.baseURL + '/chat/completions', { body, headers: hA })));
    for (const r of res) {
      assert.ok([200, 409, 429].includes(r.status), `${r.status} ${r.text.slice(0, 200)}`);
      if (r.status === 200) assert.equal(r.json.choices[0].message.content, GOLDEN[ONCE]);
    }
    assert.ok(res.some((r) => r.status === 200));
    const after = await jfetch(b.baseURL + '/chat/completions', { body, headers: hA });
    assert.equal(after.status, 200, after.text);
    assert.equal(after.json.choices[0].message.content, GOLDEN[ONCE]);
  });

  it('DELETE removes it for its owner', async () => {
    const d = await jfetch(a.url + `/v1/sessions/${sidA}`, { method: 'DELETE', headers: hA });
    assert.equal(d.status, 200, d.text);
    const g = await jfetch(a.url + `/v1/sessions/${sidA}`, { method: 'GET', headers: hA });
    assert.equal(g.status, 404);
    const c = await jfetch(a.baseURL + '/chat/completions', { body: turn1Body(sidA), headers: hA });
    assert.equal(c.status, 404);
    const again = await jfetch(a.url + `/v1/sessions/${sidA}`, { method: 'DELETE', headers: hA });
    assert.equal(again.status, 404);
  });
});

/* ---- limits, expiry, restart over the cap, full disk, owner ids on disk ---- */

const chatIn = (srv, sid, h = {}, content = ONCE) => jfetch(srv.baseURL + '/chat/completions', {
  headers: h, body: { model: 'm', temperature: 0, max_tokens: 8, session_id: sid, messages: [{ role: 'user', content }] },
});
const create = (srv, h = {}) => jfetch(srv.url + '/v1/sessions', { body: {}, headers: h });
/* The server's bytes at the end of a session record: magic (4 ASCII bytes) + owner id (u64 LE, hex). */
const recordOwner = (dir, sid) => {
  const b = fs.readFileSync(path.join(dir, 'sessions', `${sid}.kvpm`));
  const x = b.subarray(b.length - 12);
  return { magic: x.subarray(0, 4).toString('latin1'), owner: x.readBigUInt64LE(4).toString(16) };
};

describe('sessions: limits and lifetime', { timeout: 110000 }, () => {
  const dirs = [];
  const servers = [];
  const dir = (tag) => { const d = tmpDir(tag); dirs.push(d); return d; };
  const start = async (opts, wrap) => {
    const srv = wrap ? await startServerWrapped(wrap, opts) : await startServer(opts);
    servers.push(srv);
    return srv;
  };
  after(async () => {
    await Promise.all(servers.map((x) => x.stop()));
    for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
  });

  it('--max-sessions-per-key: key A at its limit does not block key B (429 names the flag)', async () => {
    const srv = await start({ args: ['--api-key', KA, '--api-key', KB, '--max-sessions', '100', '--max-sessions-per-key', '2'] });
    const a = [];
    for (let i = 0; i < 2; i++) {
      const r = await create(srv, hA);
      assert.equal(r.status, 200, r.text);
      a.push(r.json.id);
    }
    const refused = await create(srv, hA);
    assert.equal(refused.status, 429, refused.text);
    assertErrorShape(assert, refused.json, { type: 'rate_limit_error', code: 'too_many_sessions' });
    assert.match(refused.json.error.message, /--max-sessions-per-key 2/);
    for (let i = 0; i < 2; i++) assert.equal((await create(srv, hB)).status, 200, 'key B is not blocked by key A');
    assert.equal((await create(srv, hB)).status, 429);
    /* a deletion frees a place for its own key */
    assert.equal((await jfetch(srv.url + `/v1/sessions/${a[0]}`, { method: 'DELETE', headers: hA })).status, 200);
    assert.equal((await create(srv, hA)).status, 200);
  });

  it('the per-key default is a quarter of --max-sessions; without keys the limit is --max-sessions', async () => {
    const keyed = await start({ args: ['--api-key', KA, '--api-key', KB, '--max-sessions', '8'] });
    for (let i = 0; i < 2; i++) assert.equal((await create(keyed, hA)).status, 200);
    const r = await create(keyed, hA);
    assert.equal(r.status, 429, r.text);
    assert.match(r.json.error.message, /--max-sessions-per-key 2/);
    const open = await start({ args: ['--max-sessions', '3'] });
    for (let i = 0; i < 3; i++) assert.equal((await create(open)).status, 200);
    const g = await create(open);
    assert.equal(g.status, 429, g.text);
    assertErrorShape(assert, g.json, { type: 'rate_limit_error', code: 'too_many_sessions' });
    assert.match(g.json.error.message, /--max-sessions 3/);
  });

  it('--session-ttl: idle sessions are deleted from every tier, logged and counted; a used one stays', async () => {
    const d = dir('ttl');
    const srv = await start({ args: ['--session-dir', d, '--session-ttl', '4'] });
    const hot = (await create(srv)).json.id;
    const cold = (await create(srv)).json.id;
    const empty = (await create(srv)).json.id;
    const kept = (await create(srv)).json.id;
    for (const sid of [hot, cold, kept]) assert.equal((await chatIn(srv, sid)).status, 200);
    assert.equal((await jfetch(srv.url + `/v1/sessions/${cold}/save`)).status, 200);
    assert.ok(fs.existsSync(path.join(d, 'sessions', `${cold}.kvpm`)));
    /* keep one in use while the others go idle; the runner's timeout catches a hang */
    const gone = (sid) => jfetch(srv.url + `/v1/sessions/${sid}`, { method: 'GET' }).then((r) => r.status === 404);
    let turns = 0;
    await waitFor('the idle sessions to expire', async () => {
      assert.equal((await chatIn(srv, kept)).status, 200);
      turns++;
      await sleep(200);
      return (await gone(hot)) && (await gone(cold)) && (await gone(empty));
    }, 30000);
    assert.ok(turns > 0);
    assert.equal((await gone(kept)), false, 'the session in use was expired');
    assert.ok(!fs.existsSync(path.join(d, 'sessions', `${cold}.kvpm`)), 'the saved session is still on disk');
    const m = await jfetch(srv.url + '/metrics', { method: 'GET' });
    assert.ok(metricValue(m.text, 'kvpark_session_events_total', { event: 'expire' }) >= 3, m.text);
    for (const sid of [hot, cold, empty]) assert.match(srv.log(), new RegExp(`session ${sid} expired`));
    assert.equal((await chatIn(srv, cold)).status, 404);
  });

  it('a restart with more stored sessions than --max-sessions keeps them all; new ones wait for room', async () => {
    const d = dir('cap');
    let srv = await start({ args: ['--session-dir', d, '--max-sessions', '10'] });
    const ids = [];
    for (let i = 0; i < 3; i++) {
      const sid = (await create(srv)).json.id;
      assert.equal((await chatIn(srv, sid)).status, 200);
      assert.equal((await jfetch(srv.url + `/v1/sessions/${sid}/save`)).status, 200);
      ids.push(sid);
    }
    await srv.stop();
    srv = await start({ args: ['--session-dir', d, '--max-sessions', '2'] });
    const list = await jfetch(srv.url + '/v1/sessions', { method: 'GET' });
    assert.deepEqual(list.json.data.map((e) => e.id).sort(), [...ids].sort(), 'every stored session is kept');
    assert.match(srv.log(), /3 stored sessions loaded, more than --max-sessions 2: all are kept/);
    const r = await create(srv);
    assert.equal(r.status, 429, r.text);
    assert.match(r.json.error.message, /--max-sessions 2/);
    for (const sid of ids) {
      const c = await chatIn(srv, sid);
      assert.equal(c.status, 200, c.text);
      assert.ok(c.json.usage.prompt_tokens_details.cached_tokens > 0, 'restored from disk');
    }
    for (const sid of ids.slice(0, 2))
      assert.equal((await jfetch(srv.url + `/v1/sessions/${sid}`, { method: 'DELETE' })).status, 200);
    assert.equal((await create(srv)).status, 200, 'under the cap again: creation works');
  });

  it('a save on a full disk answers 507 with the reason (file-size limit: ulimit -f)', async () => {
    const srv = await start({ args: ['--session-dir', dir('full')] }, ['bash', '-c', 'ulimit -f 1; exec "$0" "$@"']);
    const sid = (await create(srv)).json.id;
    assert.equal((await chatIn(srv, sid)).status, 200);
    const r = await jfetch(srv.url + `/v1/sessions/${sid}/save`);
    assert.equal(r.status, 507, r.text);
    assertErrorShape(assert, r.json, { type: 'server_error', code: 'insufficient_storage' });
    assert.match(r.json.error.message, /File too large|No space left/);
    assert.equal((await chatIn(srv, sid)).status, 200, 'the session is still usable');
  });

  it('owner ids on disk are keyed with the store secret; sessions of an older version stay their key\'s', async () => {
    const d = dir('owner');
    const args = ['--session-dir', d, '--api-key', KA, '--api-key', KB];
    /* the "older version": writes the unkeyed owner id, as kvpark did before */
    let srv = await start({ args }, ['env', 'KVPARK_TEST_LEGACY_OWNER=1']);
    const old = (await create(srv, hA)).json.id;
    assert.equal((await chatIn(srv, old, hA)).status, 200);
    assert.equal((await jfetch(srv.url + `/v1/sessions/${old}/save`, { headers: hA })).status, 200);
    await srv.stop();
    const before = recordOwner(d, old);
    assert.equal(before.magic, 'SXPK', 'the old record format');

    srv = await start({ args }); /* the upgrade */
    assert.match(srv.log(), /1 stored sessions of older versions now record their owner as a keyed hash/);
    const after1 = recordOwner(d, old);
    assert.equal(after1.magic, 'SXP2');
    assert.notEqual(after1.owner, before.owner, 'the owner on disk is no longer the unkeyed hash of the key');
    const fresh = (await create(srv, hA)).json.id;
    assert.equal((await chatIn(srv, fresh, hA)).status, 200);
    assert.equal((await jfetch(srv.url + `/v1/sessions/${fresh}/save`, { headers: hA })).status, 200);
    assert.deepEqual(recordOwner(d, fresh), after1, 'new sessions of the same key record the same keyed id');
    const st = fs.statSync(path.join(d, 'owner.secret'));
    assert.equal(st.mode & 0o777, 0o600);
    assert.equal(st.size, 32);
    /* still key A's, and only key A's */
    const c = await chatIn(srv, old, hA);
    assert.equal(c.status, 200, c.text);
    assert.ok(c.json.usage.prompt_tokens_details.cached_tokens > 0, 'restored from disk');
    assert.equal((await chatIn(srv, old, hB)).status, 404);
    assert.equal((await jfetch(srv.url + `/v1/sessions/${old}`, { method: 'GET', headers: hB })).status, 404);
    await srv.stop();
    srv = await start({ args }); /* nothing left to migrate; still accessible */
    assert.doesNotMatch(srv.log(), /older versions now record/);
    assert.equal((await jfetch(srv.url + `/v1/sessions/${old}`, { method: 'GET', headers: hA })).status, 200);
  });
});

/* The next turn of a session reuses everything the last one left in it, the
 * reply included, whatever the chat template: the client sends the reply
 * back as text, the server continues from the tokens the model wrote. */
describe('a session reuses the previous reply, for every template', { timeout: 120000 }, () => {
  for (const tmpl of ['plain', 'chatml', 'llama2', 'llama3']) {
    it(`--chat-template ${tmpl}`, async () => {
      const server = await startServer({ args: ['-c', '512', '--chat-template', tmpl] });
      try {
        const sid = await newSession(server);
        const msgs = [{ role: 'user', content: ONCE }];
        const t1 = await jfetch(server.url + '/v1/chat/completions', {
          body: { model: 'm', temperature: 0, max_tokens: 12, ignore_eos: true, session_id: sid, messages: msgs },
        });
        assert.equal(t1.status, 200, t1.text);
        const reply = t1.json.choices[0].message.content;
        const info = await jfetch(server.url + `/v1/sessions/${sid}`, { method: 'GET' });
        const held = info.json.tokens;
        assert.ok(held >= t1.json.usage.prompt_tokens + 11, `session holds ${held} tokens`);
        const t2 = await jfetch(server.url + '/v1/chat/completions', {
          body: {
            model: 'm', temperature: 0, max_tokens: 4, session_id: sid,
            messages: [...msgs, { role: 'assistant', content: reply }, { role: 'user', content: 'The end.' }],
          },
        });
        assert.equal(t2.status, 200, t2.text);
        const cached = t2.json.usage.prompt_tokens_details.cached_tokens;
        assert.equal(cached, held, `${tmpl}: turn 2 reused ${cached} of the ${held} tokens the session held ` +
          `(reply ${JSON.stringify(reply)})`);
        assert.ok(t2.json.usage.prompt_tokens > held);
      } finally {
        await server.stop();
      }
    });
  }

  it('a reply the model split differently from the tokenizer is still reused whole', async () => {
    /* "Once upon a time there" as the tokenizer would not write it: "▁the" + "re"
     * (stories260K ids 265, 276) instead of "▁there"; a completion on the session
     * puts exactly these tokens and its continuation into the KV */
    const forced = [1, 403, 407, 261, 378, 265, 276];
    const canon = execFileSync(BIN, ['tokenize', '-m', MODEL, 'Once upon a time there'], { encoding: 'utf8' })
      .trim().split(/\s+/).map(Number);
    assert.notDeepEqual(canon, forced, 'the premise: the forced ids are not the canonical ones');
    const server = await startServer({ args: ['-c', '512', '--chat-template', 'plain'] });
    try {
      const sid = await newSession(server);
      const t1 = await jfetch(server.url + '/v1/completions', {
        body: { model: 'm', temperature: 0, max_tokens: 8, ignore_eos: true, session_id: sid, prompt: forced },
      });
      assert.equal(t1.status, 200, t1.text);
      const info = await jfetch(server.url + `/v1/sessions/${sid}`, { method: 'GET' });
      const held = info.json.tokens;
      const t2 = await jfetch(server.url + '/v1/chat/completions', {
        body: {
          model: 'm', temperature: 0, max_tokens: 4, session_id: sid,
          messages: [{ role: 'user', content: 'Once upon a time there' },
            { role: 'assistant', content: t1.json.choices[0].text }, { role: 'user', content: 'The end.' }],
        },
      });
      assert.equal(t2.status, 200, t2.text);
      assert.equal(t2.json.usage.prompt_tokens_details.cached_tokens, held,
        `turn 2 reused ${t2.json.usage.prompt_tokens_details.cached_tokens} of ${held} (canonical ids diverge at 5)`);
    } finally {
      await server.stop();
    }
  });
});
