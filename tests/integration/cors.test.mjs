/*
 * cors.test.mjs — browser clients (`--cors-origin`): preflights answered
 * without a key, Access-Control-* headers on every kind of response
 * (JSON, SSE, errors), listed origins only, `*`, and CORS off by default.
 *
 * Why: a web page calling kvpark directly is refused by the browser unless
 * the preflight and every answer carry the right headers; a server that
 * sends them to every origin, or needs a key for the preflight (browsers
 * never send one there), breaks either safety or the page.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { ONCE, chatBody, rawRequest, startServer } from './helpers.mjs';

const APP = 'https://app.example:8443';
const KEY = 'sk-cors-test';

function preflight(url, origin, headers = 'authorization, content-type') {
  return rawRequest(url + '/v1/chat/completions', {
    method: 'OPTIONS',
    headers: { origin, 'access-control-request-method': 'POST', 'access-control-request-headers': headers },
  });
}

function post(url, body, headers) {
  return rawRequest(url + '/v1/chat/completions', { method: 'POST', headers, body: JSON.stringify(body) });
}

describe('CORS with listed origins', { timeout: 60000 }, () => {
  let server;
  before(async () => {
    server = await startServer({ args: ['--api-key', KEY, '--cors-origin', APP, '--cors-origin', 'http://localhost:3000'] });
  });
  after(async () => { if (server) await server.stop(); });

  it('a preflight from a listed origin is 204 without a key, saying what may follow', async () => {
    const r = await preflight(server.url, APP, 'authorization, content-type, x-session-id');
    assert.equal(r.status, 204, r.text);
    assert.equal(r.headers['access-control-allow-origin'], APP);
    assert.match(r.headers['access-control-allow-methods'], /\bPOST\b/);
    assert.match(r.headers['access-control-allow-methods'], /\bDELETE\b/);
    assert.equal(r.headers['access-control-allow-headers'], 'authorization, content-type, x-session-id');
    assert.match(r.headers.vary || '', /Origin/);
    assert.ok(Number(r.headers['access-control-max-age']) > 0);
    const r2 = await preflight(server.url, 'http://localhost:3000');
    assert.equal(r2.status, 204);
    assert.equal(r2.headers['access-control-allow-origin'], 'http://localhost:3000');
  });

  it('a preflight from another origin is 403 and carries no Allow-Origin', async () => {
    for (const origin of ['https://evil.example', 'https://app.example', APP + '/', 'null']) {
      const r = await preflight(server.url, origin);
      assert.equal(r.status, 403, origin);
      assert.equal(r.headers['access-control-allow-origin'], undefined, origin);
      assert.equal(r.json.error.code, 'cors_origin_not_allowed');
    }
  });

  it('answers to a listed origin carry the headers: JSON, SSE and errors', async () => {
    const auth = { authorization: `Bearer ${KEY}`, origin: APP };
    const ok = await post(server.url, chatBody(ONCE, { max_tokens: 3 }), auth);
    assert.equal(ok.status, 200, ok.text);
    assert.equal(ok.headers['access-control-allow-origin'], APP);
    assert.match(ok.headers['access-control-expose-headers'], /X-Session-Id/i);
    const stream = await post(server.url, chatBody(ONCE, { max_tokens: 3, stream: true }), auth);
    assert.equal(stream.status, 200);
    assert.match(stream.headers['content-type'], /text\/event-stream/);
    assert.equal(stream.headers['access-control-allow-origin'], APP);
    /* a refused key: the page must be able to read the 401 */
    const denied = await post(server.url, chatBody(ONCE, { max_tokens: 3 }), { origin: APP });
    assert.equal(denied.status, 401);
    assert.equal(denied.headers['access-control-allow-origin'], APP);
    const models = await rawRequest(server.url + '/v1/models', { headers: auth });
    assert.equal(models.status, 200);
    assert.equal(models.headers['access-control-allow-origin'], APP);
  });

  it('answers to other origins, or without Origin, carry none', async () => {
    const r = await post(server.url, chatBody(ONCE, { max_tokens: 2 }),
      { authorization: `Bearer ${KEY}`, origin: 'https://evil.example' });
    assert.equal(r.status, 200); /* not a browser: the server does not police non-CORS use */
    assert.equal(r.headers['access-control-allow-origin'], undefined);
    const r2 = await post(server.url, chatBody(ONCE, { max_tokens: 2 }), { authorization: `Bearer ${KEY}` });
    assert.equal(r2.headers['access-control-allow-origin'], undefined);
  });
});

describe('CORS for any origin, and off', { timeout: 60000 }, () => {
  it('--cors-origin * answers every origin with *', async () => {
    const server = await startServer({ args: ['--cors-origin', '*'] });
    try {
      const p = await preflight(server.url, 'https://anything.example');
      assert.equal(p.status, 204);
      assert.equal(p.headers['access-control-allow-origin'], '*');
      const r = await post(server.url, chatBody(ONCE, { max_tokens: 2 }), { origin: 'https://anything.example' });
      assert.equal(r.status, 200);
      assert.equal(r.headers['access-control-allow-origin'], '*');
    } finally {
      await server.stop();
    }
  });

  it('without --cors-origin a preflight is 403 saying how to turn CORS on', async () => {
    const server = await startServer();
    try {
      const p = await preflight(server.url, APP);
      assert.equal(p.status, 403);
      assert.match(p.json.error.message, /--cors-origin/);
      assert.equal(p.headers['access-control-allow-origin'], undefined);
      const r = await post(server.url, chatBody(ONCE, { max_tokens: 2 }), { origin: APP });
      assert.equal(r.status, 200);
      assert.equal(r.headers['access-control-allow-origin'], undefined);
    } finally {
      await server.stop();
    }
  });
});
