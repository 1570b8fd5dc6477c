/*
 * autocodec.test.mjs — `--codec auto` (the default): the server finds or
 * makes its model's learned codec (server/autocodec.h).
 *
 *   - From traffic: a fresh cold dir has no codec file, so the server parks
 *     with int8 and collects the prompts it serves (a prompt already seen is
 *     not counted again; a conversation's next turn adds only its new tokens).
 *     Once enough are in, it calibrates in the background, validates the
 *     codec on a held-out tenth (KL within half the bound), writes it to
 *     COLD/autocodec/ with a sidecar, and new saves use it. /v1/codec and
 *     /metrics show each state; /v1/codec shows no token counts of traffic
 *     (another tenant's volume). A session saved with int8 before the switch
 *     still restores after it.
 *   - Restart: the codec made earlier is found (state done, how it was made),
 *     and the session saved with it resumes from the cold tier.
 *   - From --calib-text: calibrated without any request; token counts shown.
 *   - A --calib-text that cannot be read: state failed with the reason, the
 *     server keeps serving and parking with int8.
 *   - MODEL.kvcodec beside MODEL.gguf is used (nothing calibrated); one of
 *     another model there is skipped with a log line.
 *   - The calib flags with another codec are a usage error.
 *   - SIGTERM during a calibration: the server exits cleanly, no codec file.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { BIN, MODEL, SHARED, jfetch, metricValue, startServer, tmpDir, waitFor } from './helpers.mjs';

const KEY = 'key-auto';
const H = { authorization: `Bearer ${KEY}` };
const TRAIN = path.join(SHARED, 'data', 'tinystories-train-calib.txt');
const HD64 = path.join(SHARED, 'models', 'stories-hd64.gguf');

describe('--codec auto', { timeout: 240000 }, () => {
  const dir = tmpDir('autocodec');
  const servers = [];
  after(async () => {
    await Promise.all(servers.map((s) => s.stop()));
    fs.rmSync(dir, { recursive: true, force: true });
  });
  const codecOf = async (srv) => {
    const r = await jfetch(srv.url + '/v1/codec', { method: 'GET', headers: H });
    assert.equal(r.status, 200, r.text);
    return r.json;
  };
  const metrics = async (srv) => (await fetch(srv.url + '/metrics')).text();

  it('calibrates from the prompts it serves, parks with the result, and finds it again after a restart', async () => {
    const cold = path.join(dir, 'cold');
    const args = ['-c', '128', '--api-key', KEY, '--cold-dir', cold, '--codec', 'auto', '--calib-tokens', '1536'];
    const s1 = await startServer({ args });
    servers.push(s1);
    const k0 = await codecOf(s1);
    assert.equal(k0.name, 'int8', 'int8 while there is no codec file');
    assert.equal(k0.calibration.state, 'collecting');
    assert.equal(k0.calibration.source, 'traffic');
    assert.equal(k0.calibration.tokens, undefined, 'no token counts of traffic on the API');
    assert.equal(metricValue(await metrics(s1), 'kvpark_codec_calibration', { state: 'collecting' }), 1);

    /* a session saved with int8 before the switch */
    const c = await jfetch(s1.url + '/v1/sessions', { body: {}, headers: H });
    assert.equal(c.status, 200, c.text);
    const early = c.json.id;
    const story = fs.readFileSync(TRAIN, 'utf8').slice(0, 200);
    const r = await jfetch(s1.baseURL + '/completions', { headers: { ...H, 'x-session-id': early },
      body: { model: 'm', prompt: story, max_tokens: 4, temperature: 0 } });
    assert.equal(r.status, 200, r.text);
    const sv0 = await jfetch(s1.url + `/v1/sessions/${early}/save`, { headers: H });
    assert.equal(sv0.json.codec, 'int8');

    const collected = async () => metricValue(await metrics(s1), 'kvpark_codec_calibration_tokens', { kind: 'collected' });
    const n0 = await collected();
    assert.ok(n0 > 50, `the first prompt was kept: ${n0}`);
    /* the same prompt again adds nothing */
    const again = await jfetch(s1.baseURL + '/completions', { headers: H,
      body: { model: 'm', prompt: story, max_tokens: 4, temperature: 0 } });
    assert.equal(again.status, 200, again.text);
    assert.equal(await collected(), n0, 'a prompt seen already is not counted again');

    /* traffic: distinct stories, ~100 tokens each, until the calibration starts */
    const text = fs.readFileSync(TRAIN, 'utf8');
    let off = 1000;
    for (let i = 0; i < 200 && (await codecOf(s1)).calibration.state === 'collecting'; i++, off += 220) {
      const p = await jfetch(s1.baseURL + '/completions', { headers: H,
        body: { model: 'm', prompt: text.slice(off, off + 220), max_tokens: 1, temperature: 0 } });
      assert.equal(p.status, 200, p.text);
    }
    const k1 = await waitFor('the calibration to end', async () => {
      const k = await codecOf(s1);
      return k.calibration.state === 'done' || k.calibration.state === 'failed' ? k : null;
    }, 120000);
    assert.equal(k1.calibration.state, 'done', JSON.stringify(k1) + s1.log());
    assert.match(k1.name, /^auto-[0-9a-f]{16}\.kvcodec$/);
    assert.equal(k1.kind, 'learned');
    assert.deepEqual(k1.layout, { chunk: 64, sink: 0, window: 8 });
    assert.equal(k1.calibration.kl_bound, 0.002);
    assert.ok(k1.calibration.heldout_kl > 0 && k1.calibration.heldout_kl <= 0.001,
      `validated at half the bound: ${k1.calibration.heldout_kl}`);
    assert.ok(k1.calibration.heldout_ratio > 1, JSON.stringify(k1));
    assert.equal(k1.calibration.file, k1.name, 'its name, not where the server keeps it');
    assert.match(s1.log(), /codec auto: wrote .*held-out ratio/);
    const m1 = await metrics(s1);
    assert.equal(metricValue(m1, 'kvpark_codec_calibration', { state: 'done' }), 1);
    assert.equal(metricValue(m1, 'kvpark_codec_calibration_progress'), 1);
    const own = path.join(cold, 'autocodec', k1.name);
    assert.ok(fs.existsSync(own));
    const side = JSON.parse(fs.readFileSync(own.replace(/\.kvcodec$/, '.json'), 'utf8'));
    assert.equal(side.source, 'traffic');
    assert.equal(side.text ?? null, null, 'no text file');
    assert.equal(side.heldout_kl, k1.calibration.heldout_kl);

    /* a new session parks with it */
    const c2 = await jfetch(s1.url + '/v1/sessions', { body: {}, headers: H });
    const sid = c2.json.id;
    const msg = text.slice(50000, 50200);
    const t1 = await jfetch(s1.baseURL + '/completions', { headers: { ...H, 'x-session-id': sid },
      body: { model: 'm', prompt: msg, max_tokens: 4, temperature: 0 } });
    assert.equal(t1.status, 200, t1.text);
    const sv = await jfetch(s1.url + `/v1/sessions/${sid}/save`, { headers: H });
    assert.equal(sv.status, 200, sv.text);
    assert.equal(sv.json.codec, k1.name, 'saves use the new codec');
    await s1.stop();

    /* restart: the codec is found, both sessions resume from the cold tier */
    const s2 = await startServer({ args });
    servers.push(s2);
    const k2 = await codecOf(s2);
    assert.equal(k2.name, k1.name);
    assert.equal(k2.calibration.state, 'done');
    assert.equal(k2.calibration.source, 'traffic');
    assert.equal(k2.calibration.heldout_kl, k1.calibration.heldout_kl);
    assert.match(s2.log(), /codec auto: parking with .*auto-/);
    for (const [id, prompt] of [[sid, msg], [early, story]]) {
      const t = await jfetch(s2.baseURL + '/completions', { headers: { ...H, 'x-session-id': id },
        body: { model: 'm', prompt: prompt + ' The end.', max_tokens: 2, temperature: 0 } });
      assert.equal(t.status, 200, t.text);
      assert.ok(t.json.usage.prompt_tokens_details?.cached_tokens > 40, `restored, not recomputed: ${t.text}`);
    }
    await s2.stop();
  });

  it('calibrates from --calib-text at once; a text it cannot read fails clearly and int8 stays', async () => {
    const s = await startServer({ args: ['-c', '128', '--api-key', KEY, '--cold-dir', path.join(dir, 'text'),
      '--calib-text', TRAIN, '--calib-tokens', '1536', '--calib-max-kl', '0.004'] });
    servers.push(s);
    const k = await waitFor('the calibration', async () => {
      const j = await codecOf(s);
      return j.calibration.state === 'done' || j.calibration.state === 'failed' ? j : null;
    }, 120000);
    assert.equal(k.calibration.state, 'done', JSON.stringify(k));
    assert.equal(k.calibration.source, 'text');
    assert.equal(k.calibration.kl_bound, 0.004);
    assert.equal(k.calibration.needed, 1536);
    assert.ok(k.calibration.tokens > 1000 && k.calibration.heldout_kl <= 0.002, JSON.stringify(k));
    assert.equal(k.kind, 'learned');
    await s.stop();

    const bad = await startServer({ args: ['--api-key', KEY, '--cold-dir', path.join(dir, 'bad'),
      '--calib-text', path.join(dir, 'missing.txt')] });
    servers.push(bad);
    const kb = await waitFor('the failure', async () => {
      const j = await codecOf(bad);
      return j.calibration.state === 'failed' ? j : null;
    }, 30000);
    assert.match(kb.calibration.error, /cannot open --calib-text .*missing\.txt/);
    assert.equal(kb.name, 'int8');
    assert.match(bad.log(), /calibration failed/);
    const r = await jfetch(bad.baseURL + '/completions', { headers: H, body: { model: 'm', prompt: 'Once', max_tokens: 2 } });
    assert.equal(r.status, 200, 'still serving');
    assert.equal(metricValue(await metrics(bad), 'kvpark_codec_calibration', { state: 'failed' }), 1);
    await bad.stop();
  });

  it('a codec file beside the model is used; one of another model there is skipped', async () => {
    const mdir = path.join(dir, 'models');
    fs.mkdirSync(mdir, { recursive: true });
    const model = path.join(mdir, 'stories.gguf');
    fs.copyFileSync(MODEL, model);
    const calib = path.join(dir, 'calib.txt');
    fs.writeFileSync(calib, fs.readFileSync(TRAIN, 'utf8').slice(0, 6000));
    const beside = path.join(mdir, 'stories.kvcodec');
    /* another model's codec first */
    let r = spawnSync(BIN, ['calibrate', '-m', HD64, '-f', calib, '-o', beside, '--bits', '2'], { encoding: 'utf8' });
    assert.equal(r.status, 0, r.stderr);
    const s0 = await startServer({ model, args: ['--api-key', KEY, '--cold-dir', path.join(dir, 'beside0'), '--codec', 'auto'] });
    servers.push(s0);
    assert.match(s0.log(), /codec auto: skipping .*stories\.kvcodec/);
    const k0 = await codecOf(s0);
    assert.equal(k0.name, 'int8');
    assert.equal(k0.calibration.state, 'collecting');
    await s0.stop();
    r = spawnSync(BIN, ['calibrate', '-m', model, '-f', calib, '-o', beside, '--bits', '2'], { encoding: 'utf8' });
    assert.equal(r.status, 0, r.stderr);
    const s1 = await startServer({ model, args: ['--api-key', KEY, '--cold-dir', path.join(dir, 'beside1'), '--codec', 'auto'] });
    servers.push(s1);
    const k1 = await codecOf(s1);
    assert.equal(k1.name, 'stories.kvcodec');
    assert.equal(k1.kind, 'learned');
    assert.equal(k1.calibration.state, 'off', 'nothing to calibrate');
    assert.equal(k1.calibration.file, 'stories.kvcodec');
    await s1.stop();
  });

  it('the calib flags with another codec are a usage error', () => {
    const r = spawnSync(BIN, ['serve', '-m', MODEL, '--codec', 'int8', '--calib-tokens', '4096'], { encoding: 'utf8' });
    assert.equal(r.status, 2);
    assert.match(r.stderr, /apply to --codec auto/);
    const r2 = spawnSync(BIN, ['serve', '-m', MODEL, '--calib-max-kl', '-1'], { encoding: 'utf8' });
    assert.equal(r2.status, 2);
    assert.match(r2.stderr, /bad calib-max-kl/);
  });

  it('a shutdown during a calibration is clean and writes no codec', async () => {
    const cold = path.join(dir, 'stop');
    const s = await startServer({ model: HD64, args: ['--cold-dir', cold, '--calib-text', TRAIN, '--calib-tokens', '65536'] });
    await waitFor('the calibration to start', async () => {
      const j = (await jfetch(s.url + '/v1/codec', { method: 'GET' })).json;
      return j.calibration.state === 'calibrating';
    }, 20000);
    const ex = await s.stop({ graceMs: 60000 });
    assert.ok(!ex.killed, 'it exited on SIGTERM (the calibration was canceled)');
    assert.equal(ex.code, 0, s.log());
    assert.match(s.log(), /shutting down/);
    const files = fs.existsSync(path.join(cold, 'autocodec')) ? fs.readdirSync(path.join(cold, 'autocodec')) : [];
    assert.deepEqual(files.filter((f) => f.endsWith('.kvcodec')), [], 'nothing written');
  });
});
