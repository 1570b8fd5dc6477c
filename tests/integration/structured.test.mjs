/*
 * structured.test.mjs — structured output (`response_format`) end to end with
 * the official OpenAI SDK: json_object and json_schema answers always parse
 * and validate (ajv, with formats) for several schemas and seeds at
 * temperature 1, on a trained tiny model (stories260K) and a random-weight
 * GPT-2 (tiny-gpt2, 50K vocabulary); streaming gives the same text;
 * `client.chat.completions.parse` with a zod schema; bad response_format
 * values are 400s naming the param.
 *
 * Why: a client that asks for JSON must get JSON it can parse, whatever the
 * model; the grammar engine is unit-tested, this checks it is wired in.
 */
import assert from 'node:assert/strict';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import Ajv2020 from 'ajv/dist/2020.js';
import addFormats from 'ajv-formats';
import { z } from 'zod';
import { zodResponseFormat } from 'openai/helpers/zod';
import { SHARED, assertErrorShape, collectStream, jfetch, startServer } from './helpers.mjs';

const ajv = new Ajv2020({ strict: false });
addFormats(ajv);

const SCHEMAS = {
  person: {
    type: 'object',
    properties: {
      name: { type: 'string', maxLength: 12 },
      age: { type: 'integer' },
      email_ok: { type: 'boolean' },
    },
    required: ['name', 'age', 'email_ok'],
    additionalProperties: false,
  },
  colors: {
    type: 'array',
    items: { enum: ['red', 'green', 'blue', null, 7] },
    minItems: 1,
    maxItems: 5,
  },
  event: {
    type: 'object',
    properties: {
      when: { type: 'string', format: 'date' },
      at: { type: 'string', format: 'date-time' },
      id: { type: 'string', format: 'uuid' },
      score: { type: ['number', 'null'] },
      tags: { type: 'array', items: { type: 'string', maxLength: 4 }, maxItems: 3 },
    },
    required: ['when', 'at', 'id', 'score', 'tags'],
    additionalProperties: false,
  },
  tree: {
    $defs: {
      node: {
        type: 'object',
        properties: {
          v: { type: 'integer' },
          kids: { type: 'array', items: { $ref: '#/$defs/node' }, maxItems: 2 },
        },
        required: ['v'],
        additionalProperties: false,
      },
    },
    $ref: '#/$defs/node',
  },
  choice: {
    anyOf: [
      { type: 'object', properties: { kind: { const: 'a' }, n: { type: 'integer' } }, required: ['kind', 'n'], additionalProperties: false },
      { type: 'object', properties: { kind: { const: 'b' }, s: { type: 'string', minLength: 1, maxLength: 3 } }, required: ['kind', 's'], additionalProperties: false },
    ],
  },
};

function jsonSchemaFormat(name, schema) {
  return { type: 'json_schema', json_schema: { name, schema, strict: true } };
}

/* [label, model file, context]: tiny-gpt2 has 256 learned positions */
for (const [label, model, ctx] of [
  ['stories260K', undefined, 2048],
  ['tiny-gpt2 (random weights)', path.join(SHARED, 'models', 'tiny-gpt2.gguf'), 256],
]) {
  describe(`structured output on ${label}`, { timeout: 300000 }, () => {
    let server;
    let client;

    before(async () => {
      server = await startServer({ args: ['-c', String(ctx)], ...(model ? { model } : {}) });
      client = server.client();
    });
    after(async () => { if (server) await server.stop(); });

    for (const [name, schema] of Object.entries(SCHEMAS)) {
      it(`json_schema "${name}": every seed parses and validates, finish_reason stop`, async () => {
        const validate = ajv.compile(schema);
        for (const seed of [1, 2, 3]) {
          const r = await client.chat.completions.create({
            model: 'm',
            messages: [{ role: 'user', content: `Give me a ${name} as JSON.` }],
            response_format: jsonSchemaFormat(name, schema),
            temperature: 1,
            seed,
            max_tokens: ctx - 32,
          });
          const text = r.choices[0].message.content;
          assert.equal(r.choices[0].finish_reason, 'stop', `seed ${seed}: ${text}`);
          let v;
          assert.doesNotThrow(() => { v = JSON.parse(text); }, `seed ${seed}: not JSON: ${text}`);
          assert.ok(validate(v), `seed ${seed}: ${text}: ${JSON.stringify(validate.errors)}`);
        }
      });
    }

    it('json_object: an object that parses, and streaming gives the same text', async () => {
      for (const seed of [1, 2]) {
        const body = {
          model: 'm',
          messages: [{ role: 'user', content: 'Reply in JSON.' }],
          response_format: { type: 'json_object' },
          temperature: 1,
          seed,
          max_tokens: ctx - 32,
        };
        const r = await client.chat.completions.create(body);
        const text = r.choices[0].message.content;
        if (r.choices[0].finish_reason === 'length') continue; /* a free-text object may be cut by max_tokens */
        assert.equal(r.choices[0].finish_reason, 'stop');
        const v = JSON.parse(text);
        assert.equal(typeof v, 'object');
        assert.ok(v !== null && !Array.isArray(v), text);
        const s = await collectStream(await client.chat.completions.create({ ...body, stream: true }));
        assert.equal(s.text, text);
        assert.equal(s.finish, 'stop');
      }
    });

    it('max_tokens cuts a structured answer with finish_reason length', async () => {
      const r = await client.chat.completions.create({
        model: 'm',
        messages: [{ role: 'user', content: 'x' }],
        response_format: jsonSchemaFormat('event', SCHEMAS.event),
        temperature: 1,
        seed: 5,
        max_tokens: 3,
      });
      assert.equal(r.choices[0].finish_reason, 'length');
    });
  });
}

describe('chat.completions.parse and bad response_format', { timeout: 120000 }, () => {
  let server;
  let client;

  before(async () => {
    server = await startServer({ args: ['-c', '2048'] });
    client = server.client();
  });
  after(async () => { if (server) await server.stop(); });

  it('client.chat.completions.parse with a zod schema gives a typed object', async () => {
    const Thing = z.object({
      title: z.string().max(10),
      count: z.number().int(),
      kind: z.enum(['x', 'y']),
      note: z.string().max(5).nullable(),
    });
    for (const seed of [1, 2, 3]) {
      const r = await client.chat.completions.parse({
        model: 'm',
        messages: [{ role: 'user', content: 'A thing, please.' }],
        response_format: zodResponseFormat(Thing, 'thing'),
        temperature: 1,
        seed,
        max_tokens: 1000,
      });
      const p = r.choices[0].message.parsed;
      assert.ok(p, JSON.stringify(r.choices[0].message));
      assert.equal(Thing.safeParse(p).success, true, JSON.stringify(p));
    }
  });

  const bad = [
    [{ type: 'yaml' }, 'response_format.type'],
    ['json', 'response_format'],
    [{ type: 'json_schema' }, 'response_format.json_schema'],
    [{ type: 'json_schema', json_schema: { name: 'x' } }, 'response_format.json_schema.schema'],
    [{ type: 'json_schema', json_schema: { schema: {} } }, 'response_format.json_schema.name'],
    [{ type: 'json_schema', json_schema: { name: 'x', schema: { type: 'string', pattern: 'a+' } } },
      'response_format.json_schema.schema'],
  ];
  for (const [rf, param] of bad) {
    it(`response_format ${JSON.stringify(rf)} is a 400 naming ${param}`, async () => {
      const r = await jfetch(`${server.url}/v1/chat/completions`, {
        body: { model: 'm', messages: [{ role: 'user', content: 'hi' }], response_format: rf, max_tokens: 5 },
      });
      assert.equal(r.status, 400);
      assertErrorShape(assert, r.json, { type: 'invalid_request_error', param });
      if (param === 'response_format.json_schema.schema' && rf.json_schema.schema)
        assert.match(r.json.error.message, /pattern/);
    });
  }
});
