/*
 * embeddings.test.mjs — POST /v1/embeddings through the official openai SDK
 * (which asks for base64 by default and decodes it) and raw HTTP: unit
 * vectors of the model's size, batch = one by one, token-id inputs equal to
 * the same text, `dimensions` truncation, floats and base64 agreeing, usage,
 * errors as OpenAI shapes them, and an API key required like everywhere.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import OpenAI from 'openai';
import { assertErrorShape, jfetch, startServer } from './helpers.mjs';

const KEY = 'sk-embed-test';
const norm = (v) => Math.sqrt(v.reduce((s, x) => s + x * x, 0));
const close = (a, b, tol = 1e-5) => a.length === b.length && a.every((x, i) => Math.abs(x - b[i]) <= tol);

describe('embeddings', { timeout: 60000 }, () => {
  let server, client;
  const auth = { authorization: `Bearer ${KEY}` };
  before(async () => {
    server = await startServer({ args: ['--api-key', KEY] });
    client = new OpenAI({ apiKey: KEY, baseURL: server.baseURL, maxRetries: 0, timeout: 20000 });
  });
  after(async () => { if (server) await server.stop(); });

  it('the SDK gets one unit vector per input, of the model size, in order, with usage', async () => {
    const texts = ['Once upon a time', 'The cat sat on the mat.', 'Lily had a red ball'];
    const r = await client.embeddings.create({ model: 'stories260K.gguf', input: texts });
    assert.equal(r.object, 'list');
    assert.equal(r.data.length, 3);
    r.data.forEach((d, i) => {
      assert.equal(d.object, 'embedding');
      assert.equal(d.index, i);
      assert.equal(d.embedding.length, 64); /* stories260K: dim 64 */
      assert.ok(Math.abs(norm(d.embedding) - 1) < 1e-5, `norm ${norm(d.embedding)}`);
    });
    assert.ok(r.usage.prompt_tokens > 0 && r.usage.total_tokens === r.usage.prompt_tokens);
    /* a batch gives what each input gives alone */
    for (let i = 0; i < texts.length; i++) {
      const one = await client.embeddings.create({ model: 'm', input: texts[i] });
      assert.ok(close(one.data[0].embedding, r.data[i].embedding), `input ${i} differs alone`);
    }
    /* different texts, different vectors; the same text, the same vector */
    const dot = r.data[0].embedding.reduce((s, x, k) => s + x * r.data[1].embedding[k], 0);
    assert.ok(dot < 0.9999, `two texts gave the same vector (cosine ${dot})`);
  });

  it('float and base64 encodings agree; token-id inputs are counted as sent', async () => {
    const f = await jfetch(server.url + '/v1/embeddings', { headers: auth, body: { input: 'Once upon a time', encoding_format: 'float' } });
    assert.equal(f.status, 200, f.text);
    const b = await jfetch(server.url + '/v1/embeddings', { headers: auth, body: { input: 'Once upon a time', encoding_format: 'base64' } });
    assert.equal(b.status, 200, b.text);
    const buf = Buffer.from(b.json.data[0].embedding, 'base64');
    const dec = Array.from({ length: buf.length / 4 }, (_, i) => buf.readFloatLE(4 * i));
    assert.ok(close(dec, f.json.data[0].embedding, 1e-7));
    const ids = await jfetch(server.url + '/v1/embeddings', { headers: auth, body: { input: [[1, 403, 407, 261, 378]] } });
    assert.equal(ids.status, 200, ids.text);
    assert.equal(ids.json.usage.prompt_tokens, 5);
  });

  it('dimensions truncates and renormalises', async () => {
    const full = await client.embeddings.create({ model: 'm', input: 'Once upon a time', encoding_format: 'float' });
    const cut = await client.embeddings.create({ model: 'm', input: 'Once upon a time', dimensions: 16, encoding_format: 'float' });
    const v = full.data[0].embedding.slice(0, 16);
    const n = norm(v);
    assert.equal(cut.data[0].embedding.length, 16);
    assert.ok(close(cut.data[0].embedding, v.map((x) => x / n)));
  });

  it('bad requests are 400s naming the field; no key is 401', async () => {
    const cases = [
      [{}, 'input', 'missing_required_parameter'],
      [{ input: '' }, 'input', 'invalid_value'],
      [{ input: [99999] }, 'input', 'invalid_value'],
      [{ input: 'a', dimensions: 65 }, 'dimensions', 'invalid_value'],
      [{ input: 'a', encoding_format: 'hex' }, 'encoding_format', 'invalid_value'],
      [{ input: [Array.from({ length: 3000 }, () => 5)] }, 'input', 'context_length_exceeded'],
    ];
    for (const [body, param, code] of cases) {
      const r = await jfetch(server.url + '/v1/embeddings', { headers: auth, body });
      assert.equal(r.status, 400, `${JSON.stringify(body).slice(0, 80)}: ${r.text}`);
      assertErrorShape(assert, r.json, { type: 'invalid_request_error', param, code });
    }
    const bad = await jfetch(server.url + '/v1/embeddings', { headers: auth, body: '{"input":' });
    assert.equal(bad.status, 400);
    const noKey = await jfetch(server.url + '/v1/embeddings', { body: { input: 'a' } });
    assert.equal(noKey.status, 401);
    await assert.rejects(client.embeddings.create({ model: 'm', input: '' }), (e) => e.status === 400);
  });
});
