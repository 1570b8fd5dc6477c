/*
 * codec_change.test.mjs — a cold dir whose sessions were parked with a codec
 * file this server was not given (the file deleted, recalibrated, another
 * --codec): nothing is lost.
 *
 *   Server 1 (--codec A.kpc, a learned codec calibrated here) parks two long
 *   conversations durably. A.kpc is deleted; server 2 starts on the same
 *   cold dir with --codec B.kpc (another calibration): the store kept a copy
 *   of A in COLD/codecs, so the first session resumes from the cold tier
 *   (cached_tokens > 100), not recomputed.
 *   The kept copies are deleted too; server 3 (--codec B.kpc): the second
 *   session is still listed for its key (404 for another key), its next turn
 *   answers exactly what a reference server answers for the whole history
 *   (the KV recomputed from the token ids: cached_tokens 0), logged and
 *   counted (kvpark_session_events_total{event="recomputed"},
 *   kvpark_store_events{event="kv_lost"}); a save makes it whole again with
 *   codec B, so after a restart it resumes from the cold tier.
 *
 * Why: before, such a session was "foreign": left on disk, invisible (404)
 * to every server not given that exact codec file, its conversation lost to
 * the user though every token id was there.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { BIN, MODEL, SHARED, jfetch, metricValue, startServer, tmpDir } from './helpers.mjs';

const KEY = 'key-codec';
const H = { authorization: `Bearer ${KEY}` };
const OTHER = { authorization: 'Bearer key-other' };
const STORY = 'Once upon a time there was a little girl named Lily. She liked to play outside in the park. '.repeat(5);

describe('a codec file gone', { timeout: 120000 }, () => {
  const dir = tmpDir('codec-change');
  const servers = [];
  after(async () => {
    await Promise.all(servers.map((s) => s.stop()));
    fs.rmSync(dir, { recursive: true, force: true });
  });

  function calibrate(out, bits) {
    const calib = path.join(dir, 'calib.txt');
    if (!fs.existsSync(calib)) {
      const text = fs.readFileSync(path.join(SHARED, 'data', 'tinystories-train-calib.txt'), 'utf8');
      fs.writeFileSync(calib, text.slice(0, 6000));
    }
    const r = spawnSync(BIN, ['calibrate', '-m', MODEL, '-f', calib, '-o', out, '--bits', String(bits)],
      { encoding: 'utf8' });
    assert.equal(r.status, 0, r.stderr);
  }

  it('its kept copy restores them; without it they are recomputed from their token ids, exactly; a save makes them whole', async () => {
    const a = path.join(dir, 'A.kpc');
    const b = path.join(dir, 'B.kpc');
    calibrate(a, 2);
    calibrate(b, 4);
    const cold = path.join(dir, 'cold');
    const common = ['-c', '512', '--api-key', KEY, '--api-key', 'key-other', '--cold-dir', cold];
    const chat = (srv, messages, sid, headers = H) => jfetch(srv.baseURL + '/chat/completions', {
      headers: sid ? { ...headers, 'x-session-id': sid } : headers,
      body: { model: 'm', temperature: 0, max_tokens: 12, messages },
    });

    const s1 = await startServer({ args: [...common, '--codec', a] });
    servers.push(s1);
    const k1 = await jfetch(s1.url + '/v1/codec', { method: 'GET', headers: H });
    assert.equal(k1.status, 200, k1.text);
    assert.equal(k1.json.object, 'codec');
    assert.equal(k1.json.name, 'A.kpc');
    assert.equal(k1.json.kind, 'learned');
    assert.equal(k1.json.source, 'codec file');
    assert.match(k1.json.file_hash, /^[0-9a-f]{16}$/);
    assert.equal(k1.json.codec_files, 1);
    assert.equal((await jfetch(s1.url + '/v1/codec', { method: 'GET' })).status, 401, 'a key is needed');
    const msgs = [{ role: 'user', content: STORY }];
    const sids = [];
    let r1;
    for (let i = 0; i < 2; i++) {
      const c = await jfetch(s1.url + '/v1/sessions', { body: {}, headers: H });
      assert.equal(c.status, 200, c.text);
      sids.push(c.json.id);
      r1 = await chat(s1, msgs, c.json.id);
      assert.equal(r1.status, 200, r1.text);
      assert.ok(r1.json.usage.prompt_tokens > 100, r1.text);
      const sv = await jfetch(s1.url + `/v1/sessions/${c.json.id}/save`, { headers: H });
      assert.equal(sv.status, 200, sv.text);
      assert.equal(sv.json.codec, 'A.kpc', 'the save names the codec it parked with');
    }
    await s1.stop();
    fs.rmSync(a);
    const kept = path.join(cold, 'codecs');
    assert.equal(fs.readdirSync(kept).filter((f) => f.endsWith('.kvcodec')).length, 1, 'A kept in the cold dir');

    const hist = [...msgs, r1.json.choices[0].message, { role: 'user', content: 'What did she find?' }];
    /* A gone, B given: the kept copy of A restores the first session */
    const s2 = await startServer({ args: [...common, '--codec', b] });
    servers.push(s2);
    assert.doesNotMatch(s2.log(), /parked with a codec this server was not given/);
    const k2 = (await jfetch(s2.url + '/v1/codec', { method: 'GET', headers: H })).json;
    assert.equal(k2.name, 'B.kpc');
    assert.equal(k2.codec_files, 2, 'B, and A kept from the first run');
    assert.ok(fs.existsSync(path.join(kept, `${k1.json.file_hash}.kvcodec`)), 'kept under its hash');
    const r0 = await chat(s2, hist, sids[0]);
    assert.equal(r0.status, 200, r0.text);
    assert.ok(r0.json.usage.prompt_tokens_details?.cached_tokens > 100, `restored with the kept codec: ${r0.text}`);
    await s2.stop();

    /* the kept copies gone too: recomputed from the token ids */
    for (const f of fs.readdirSync(kept)) fs.rmSync(path.join(kept, f));
    const sid = sids[1];
    const ref = await startServer({ args: ['-c', '512', '--codec', 'none', '--cold-dir', path.join(dir, 'ref')] });
    servers.push(ref);
    const k0 = (await jfetch(ref.url + '/v1/codec', { method: 'GET' })).json;
    assert.deepEqual([k0.name, k0.kind, k0.source, k0.file_hash, k0.codec_files], ['none', 'none', 'built-in', null, 0]);
    const want = await chat(ref, hist, null, {});
    assert.equal(want.status, 200, want.text);

    const s2b = await startServer({ args: [...common, '--codec', b] });
    servers.push(s2b);
    assert.match(s2b.log(), /parked with a codec this server was not given/);
    assert.equal((await jfetch(s2b.url + `/v1/sessions/${sid}`, { method: 'GET', headers: H })).status, 200);
    assert.equal((await jfetch(s2b.url + `/v1/sessions/${sid}`, { method: 'GET', headers: OTHER })).status, 404,
      'another key still sees nothing');
    const r2 = await chat(s2b, hist, sid);
    assert.equal(r2.status, 200, r2.text);
    assert.equal(r2.json.choices[0].message.content, want.json.choices[0].message.content,
      'the recomputed KV answers as the reference');
    assert.equal(r2.json.usage.prompt_tokens_details?.cached_tokens ?? 0, 0);
    const m = (await jfetch(s2b.url + '/metrics', { method: 'GET', headers: H })).text;
    assert.equal(metricValue(m, 'kvpark_session_events_total', { event: 'recomputed' }), 1);
    assert.ok(metricValue(m, 'kvpark_store_events', { event: 'kv_lost' }) >= 1);
    const sv2 = await jfetch(s2b.url + `/v1/sessions/${sid}/save`, { headers: H });
    assert.equal(sv2.status, 200, sv2.text);
    await s2b.stop();

    const s3 = await startServer({ args: [...common, '--codec', b] });
    servers.push(s3);
    assert.doesNotMatch(s3.log(), /parked with a codec this server was not given/);
    const hist3 = [...hist, r2.json.choices[0].message, { role: 'user', content: 'And then?' }];
    const r3 = await chat(s3, hist3, sid);
    assert.equal(r3.status, 200, r3.text);
    assert.ok(r3.json.usage.prompt_tokens_details?.cached_tokens > 100, `resumed from cold: ${r3.text}`);
  });
});
