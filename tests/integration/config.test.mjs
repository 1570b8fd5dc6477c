/*
 * config.test.mjs — `kvpark serve --config FILE` and `--print-config`.
 *
 * Why: an operator's config file must take effect exactly as the flags would
 * (the port it names is where the server listens, its api-key list is
 * enforced), a flag must override it, a bad file must stop the server before
 * it starts, and --print-config must print YAML that --config reads back to
 * the same effective configuration (with the secrets redacted).
 */
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { BIN, MODEL, REPO, freePort, jfetch, startServer, tmpDir, waitFor } from './helpers.mjs';

const dir = tmpDir('config');
const write = (name, text) => { const p = path.join(dir, name); fs.writeFileSync(p, text); return p; };
const serve = (args) => spawnSync(BIN, ['serve', ...args], { encoding: 'utf8', timeout: 20000 });
const chat = { model: 'm', max_tokens: 2, temperature: 0, messages: [{ role: 'user', content: 'Hi' }] };

describe('config file', { timeout: 120000 }, () => {
  const procs = [];
  const servers = [];
  after(async () => {
    for (const p of procs) p.kill('SIGKILL');
    for (const s of servers) await s.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('the port and api-key of the file take effect', async () => {
    const port = await freePort();
    const cfg = write('a.yaml', `model: ${JSON.stringify(MODEL)}\nhost: 127.0.0.1\nport: ${port}\n` +
      `api-key: [cfg-key-one, cfg-key-two]\nctx: 256\ncold-dir: ${JSON.stringify(path.join(dir, 'cold'))}\nquiet: true\n`);
    const proc = spawn(BIN, ['serve', '--config', cfg], { stdio: ['ignore', 'pipe', 'pipe'] });
    procs.push(proc);
    let err = '';
    proc.stderr.on('data', (d) => { err += d; });
    const base = `http://127.0.0.1:${port}/v1`;
    await waitFor('server from the config file', async () => {
      try { return (await fetch(`http://127.0.0.1:${port}/health`)).status === 200; } catch { return false; }
    }, 30000).catch((e) => { throw new Error(`${e.message}\n${err}`); });
    const none = await jfetch(base + '/chat/completions', { body: chat });
    assert.equal(none.status, 401, none.text);
    const wrong = await jfetch(base + '/chat/completions', { body: chat, headers: { authorization: 'Bearer nope' } });
    assert.equal(wrong.status, 401, wrong.text);
    for (const k of ['cfg-key-one', 'cfg-key-two']) {
      const ok = await jfetch(base + '/chat/completions', { body: chat, headers: { authorization: `Bearer ${k}` } });
      assert.equal(ok.status, 200, ok.text);
    }
  });

  it('flags override the file (port, and an api-key list replaces the file\'s)', async () => {
    /* port 1 in the file; the helper passes --port P (after --config) and the server listens on P */
    const cfg = write('b.yaml', 'port: 1\napi-key: [file-key]\nctx: 256\n');
    const srv = await startServer({ args: ['--config', cfg, '--api-key', 'flag-key'] });
    servers.push(srv);
    const file = await jfetch(srv.baseURL + '/chat/completions', { body: chat, headers: { authorization: 'Bearer file-key' } });
    assert.equal(file.status, 401, file.text);
    const flag = await jfetch(srv.baseURL + '/chat/completions', { body: chat, headers: { authorization: 'Bearer flag-key' } });
    assert.equal(flag.status, 200, flag.text);
    /* and the flag's position does not matter: --port before --config still wins */
    const r = serve(['--port', '4321', '--config', cfg, '--print-config']);
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /^port: "4321"$/m);
  });

  it('--print-config round-trips and redacts the keys', () => {
    const cfg = write('c.yaml', 'port: 9191\nhot-budget: 512M\nprofile: small\nquiet: true\n' +
      'cors-origin: ["https://a.example"]\nsession-ttl: 3600\nmetrics-key: m-secret\n');
    const one = serve(['--config', cfg, '--print-config', '--max-conns', '77']);
    assert.equal(one.status, 0, one.stderr);
    assert.match(one.stdout, /^port: "9191"$/m);
    assert.match(one.stdout, /^hot-budget: "512M"$/m);
    assert.match(one.stdout, /^max-conns: "77"$/m);
    assert.match(one.stdout, /^quiet: true$/m);
    assert.match(one.stdout, /^timeout: "60"$/m); /* a default */
    assert.match(one.stdout, /^park-window: "16"$/m); /* the profile's window */
    assert.doesNotMatch(one.stdout, /m-secret/);
    /* with the metrics key put back, the printed file reads back to the same output */
    const back = write('c2.yaml', one.stdout.replace('metrics-key: "<redacted>"', 'metrics-key: m-secret'));
    const two = serve(['--config', back, '--print-config']);
    assert.equal(two.status, 0, two.stderr);
    assert.equal(two.stdout, one.stdout);
    /* api keys are never printed, and a redacted key read back is refused */
    const k = serve(['--api-key', 'top-secret-key', '--print-config']);
    assert.equal(k.status, 0, k.stderr);
    assert.doesNotMatch(k.stdout, /top-secret-key/);
    assert.match(k.stdout, /^api-key: \["<redacted>"\]/m);
    const kb = serve(['--config', write('k.yaml', k.stdout), '--print-config']);
    assert.equal(kb.status, 2);
    assert.match(kb.stderr, /api-key/);
  });

  it('bad files stop the server before it starts, naming the key and line', () => {
    const cases = [
      ['port: 99999\n', /:1: port: bad port/],
      ['port: 80\nbogus-key: 1\n', /:2: bogus-key: unknown key/],
      ['port: 80\nport: 81\n', /:2: port: duplicate key/],
      ['port:\n  a: 1\n', /port: nested mappings/],
      ['quiet: maybe\n', /quiet: 'maybe' is not a boolean/],
      ['hot-budget: lots\n', /hot-budget: bad hot-budget/],
      ['profile: tiny\n', /profile: bad profile/],
      ['port: &p 80\n', /anchors and aliases/],
    ];
    for (const [text, re] of cases) {
      const r = serve(['--config', write('bad.yaml', text), '-m', MODEL]);
      assert.equal(r.status, 2, `${text}: ${r.stderr}`);
      assert.match(r.stderr, re, text);
    }
    const missing = serve(['--config', path.join(dir, 'nope.yaml')]);
    assert.equal(missing.status, 2);
    assert.match(missing.stderr, /cannot open config file .*nope\.yaml/);
  });

  it('a profile sets the codec and the exact window; park-window overrides it, and is refused with a codec file', async () => {
    /* The same ~300-token conversation saved under each setting: a smaller exact
     * window (small's 16 rows, or park-window 0) parks fewer bytes than int4 with
     * the default 64 rows, the same codec name is reported, and the session resumes. */
    const story = 'Once upon a time there was a little girl named Lily. She liked to play outside in the park with her dog. '.repeat(6);
    const body = { model: 'm', max_tokens: 8, temperature: 0, messages: [{ role: 'user', content: story }] };
    const saved = {};
    for (const [name, args] of [['int4-64', ['--codec', 'int4']], ['small', ['--profile', 'small']],
      ['small-64', ['--profile', 'small', '--park-window', '64']], ['int4-0', ['--codec', 'int4', '--park-window', '0']]]) {
      const srv = await startServer({ args: ['--ctx', '512', '--cold-dir', path.join(dir, `pw-${name}`), ...args] });
      servers.push(srv);
      const s = await jfetch(srv.url + '/v1/sessions', { body: {} });
      assert.equal(s.status, 200, s.text);
      const h = { 'x-session-id': s.json.id };
      const c = await jfetch(srv.baseURL + '/chat/completions', { body, headers: h });
      assert.equal(c.status, 200, c.text);
      assert.ok(c.json.usage.prompt_tokens > 200, c.text);
      const sv = await jfetch(srv.url + `/v1/sessions/${s.json.id}/save`, { headers: h });
      assert.equal(sv.status, 200, sv.text);
      assert.equal(sv.json.codec, 'int4', sv.text);
      saved[name] = sv.json.bytes_new; /* the first save of the session: every stored byte is new */
      const again = await jfetch(srv.baseURL + '/chat/completions', {
        body: { ...body, messages: [...body.messages, c.json.choices[0].message, { role: 'user', content: 'And then?' }] }, headers: h });
      assert.equal(again.status, 200, again.text);
      assert.ok(again.json.usage.prompt_tokens_details.cached_tokens > 200, again.text);
    }
    assert.equal(saved['small-64'], saved['int4-64'], JSON.stringify(saved)); /* the flag overrides the profile's window */
    assert.ok(saved.small < saved['int4-64'], JSON.stringify(saved));
    assert.ok(saved['int4-0'] < saved.small, JSON.stringify(saved));
    /* a codec file keeps the window it was calibrated with */
    const f = write('fake.kvpc', 'not a codec');
    const r = serve(['--codec', f, '--park-window', '8', '-m', MODEL]);
    assert.equal(r.status, 2, r.stderr);
    assert.match(r.stderr, /park-window applies to the built-in codecs/);
    const bad = serve(['--park-window', '-3', '-m', MODEL]);
    assert.equal(bad.status, 2, bad.stderr);
    assert.match(bad.stderr, /bad park-window/);
  });

  it('deploy/kvpark.yaml.example parses and gives the defaults', () => {
    const ex = serve(['--config', path.join(REPO, 'deploy', 'kvpark.yaml.example'), '--print-config']);
    assert.equal(ex.status, 0, ex.stderr);
    const def = serve(['--print-config']);
    assert.equal(ex.stdout, def.stdout);
    /* every key, set or commented out */
    const text = fs.readFileSync(path.join(REPO, 'deploy', 'kvpark.yaml.example'), 'utf8');
    for (const line of def.stdout.split('\n').filter((l) => /^[a-z-]+:/.test(l))) {
      const key = line.split(':')[0];
      assert.match(text, new RegExp(`^(# )?${key}:`, 'm'), `the example does not show ${key}`);
    }
  });
});
