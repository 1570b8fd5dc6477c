/*
 * grammar.c — JSON-schema subset -> pushdown automaton over bytes, and the
 * token-trie walk that turns its state into a token mask (contract in
 * grammar.h).
 *
 * Why it looks like this
 *   - The schema compiles to a graph of nodes (object, array, string,
 *     number, literal set, alternatives, any value); the automaton is a stack
 *     of small fixed-size frames over those nodes, so its state is a few
 *     hundred bytes that copy cheaply. anyOf and "known key or additional
 *     key" are followed as parallel threads (a small set of stacks, deduped),
 *     so alternatives need no backtracking. A value that may end or go on
 *     (a number, an enum with "1" and "12") ends when the next byte cannot
 *     continue it: in JSON a value is only ever followed by a structural
 *     byte, so this is never ambiguous.
 *   - The trie is stored in preorder with each node's subtree end, so the
 *     mask walk is a linear scan that skips a rejected subtree in one jump;
 *     the state after d bytes lives at level d and is derived from level
 *     d-1 by one step: a token costs one step per byte NOT shared with the
 *     previous token, and a rejected prefix prunes all tokens below it.
 *   - Inside a plain string almost every token is allowed, so walking the
 *     whole trie would touch every node. Tokens whose bytes are plain string
 *     content (complete UTF-8, no quote, backslash or control byte) are
 *     precomputed as a bitmask and copied in; only the other tokens are in a
 *     second trie that is walked. This keeps a 152K vocabulary well under a
 *     millisecond per step.
 */

#include "engine/grammar.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------ */
/* compiled grammar                                                    */

enum { GN_ANY, GN_OBJ, GN_ARR, GN_STR, GN_NUM, GN_LIT, GN_ALT };
enum { FMT_NONE, FMT_DATE, FMT_DATETIME, FMT_UUID };

typedef struct glit {
    char *s;
    uint32_t len;
    int32_t payload;
} glit;

typedef struct gnode {
    int kind;
    bool integer;             /* GN_NUM */
    /* GN_OBJ */
    int n_props;
    int32_t *prop_node;       /* [n_props] */
    uint64_t required;
    int32_t addl;             /* -1: none */
    /* GN_LIT, and GN_OBJ keys ("\"name\"", payload = property index), sorted */
    glit *lits;
    int n_lits;
    /* GN_ARR */
    int32_t *prefix;
    int n_prefix;
    int32_t items;            /* -1: none */
    int32_t min_items, max_items; /* max -1: unbounded */
    /* GN_STR */
    int32_t min_len, max_len; /* max -1: unbounded */
    int fmt;
    /* GN_ALT */
    int32_t *alts;
    int n_alts;
} gnode;

struct gram {
    gnode *nodes;
    int n_nodes, cap_nodes;
    int32_t root;
};

/* built-in nodes every grammar has */
enum { N_ANY = 0, N_ANYOBJ = 1, N_ANYARR = 2, N_STRING = 3, N_NUMBER = 4, N_TFN = 5, N_BUILTIN = 6 };

static int lit_cmp(const void *a, const void *b) {
    const glit *x = a, *y = b;
    size_t n = x->len < y->len ? x->len : y->len;
    int c = memcmp(x->s, y->s, n);
    if (c) return c;
    return x->len < y->len ? -1 : x->len > y->len;
}

static int new_node(gram *g, int kind) {
    if (g->n_nodes == g->cap_nodes) {
        int nc = g->cap_nodes ? g->cap_nodes * 2 : 16;
        gnode *n = realloc(g->nodes, sizeof(gnode) * (size_t)nc);
        if (!n) return KP_ENOMEM;
        g->nodes = n;
        g->cap_nodes = nc;
    }
    gnode *n = &g->nodes[g->n_nodes];
    memset(n, 0, sizeof *n);
    n->kind = kind;
    n->addl = -1;
    n->items = -1;
    n->max_items = -1;
    n->max_len = -1;
    return g->n_nodes++;
}

void gram_free(gram *g) {
    if (!g) return;
    for (int i = 0; i < g->n_nodes; i++) {
        gnode *n = &g->nodes[i];
        for (int k = 0; k < n->n_lits; k++) free(n->lits[k].s);
        free(n->lits);
        free(n->prop_node);
        free(n->prefix);
        free(n->alts);
    }
    free(g->nodes);
    free(g);
}

static int add_lit(gnode *n, const char *s, size_t len, int32_t payload) {
    if (len > GRAM_MAX_LITERAL || n->n_lits >= GRAM_MAX_ENUM) return KP_ERANGE;
    glit *l = realloc(n->lits, sizeof(glit) * (size_t)(n->n_lits + 1));
    if (!l) return KP_ENOMEM;
    n->lits = l;
    char *c = malloc(len ? len : 1);
    if (!c) return KP_ENOMEM;
    memcpy(c, s, len);
    l[n->n_lits++] = (glit){c, (uint32_t)len, payload};
    return 0;
}

static int add_alt(gnode *n, int32_t a) {
    int32_t *p = realloc(n->alts, sizeof(int32_t) * (size_t)(n->n_alts + 1));
    if (!p) return KP_ENOMEM;
    n->alts = p;
    p[n->n_alts++] = a;
    return 0;
}

static int builtins(gram *g) {
    for (int k = 0; k < N_BUILTIN; k++) {
        static const int kinds[N_BUILTIN] = {GN_ANY, GN_OBJ, GN_ARR, GN_STR, GN_NUM, GN_LIT};
        int rc = new_node(g, kinds[k]);
        if (rc < 0) return rc;
    }
    g->nodes[N_ANYOBJ].addl = N_ANY;
    g->nodes[N_ANYARR].items = N_ANY;
    const char *w[3] = {"false", "null", "true"};
    for (int k = 0; k < 3; k++)
        if (add_lit(&g->nodes[N_TFN], w[k], strlen(w[k]), -1)) return KP_ENOMEM;
    return 0;
}

/* ---- schema compiler ---- */

typedef struct memo {
    const json_t *js;
    int32_t node;
} memo;

typedef struct cctx {
    gram *g;
    json_t *root;
    memo *memo;
    int n_memo, cap_memo;
    kp_err *err;
    int depth;
} cctx;

static int compile(cctx *c, json_t *js, char *ptr, size_t plen, int32_t *out);

static size_t ptr_push(char *ptr, size_t plen, const char *seg) {
    size_t cap = 256;
    int n = snprintf(ptr + plen, cap > plen ? cap - plen : 0, "/%s", seg);
    if (n < 0 || plen + (size_t)n >= cap) return plen;
    return plen + (size_t)n;
}

static int memo_add(cctx *c, const json_t *js, int32_t node) {
    if (c->n_memo == c->cap_memo) {
        int nc = c->cap_memo ? c->cap_memo * 2 : 16;
        memo *m = realloc(c->memo, sizeof(memo) * (size_t)nc);
        if (!m) return KP_ENOMEM;
        c->memo = m;
        c->cap_memo = nc;
    }
    c->memo[c->n_memo++] = (memo){js, node};
    return 0;
}

/* Resolve "#", "#/a/b" (RFC 6901 escapes ~0 ~1). */
static json_t *resolve_ref(json_t *root, const char *ref) {
    if (ref[0] != '#') return NULL;
    const char *p = ref + 1;
    json_t *cur = root;
    while (*p) {
        if (*p != '/') return NULL;
        p++;
        char seg[256];
        size_t k = 0;
        while (*p && *p != '/') {
            char ch = *p++;
            if (ch == '~') {
                if (*p == '0') ch = '~';
                else if (*p == '1') ch = '/';
                else return NULL;
                p++;
            }
            if (k + 1 >= sizeof seg) return NULL;
            seg[k++] = ch;
        }
        seg[k] = 0;
        if (json_is_object(cur)) cur = json_object_get(cur, seg);
        else if (json_is_array(cur)) {
            char *e;
            long i = strtol(seg, &e, 10);
            if (*e || i < 0) return NULL;
            cur = json_array_get(cur, (size_t)i);
        } else return NULL;
        if (!cur) return NULL;
    }
    return cur;
}

static bool is_annotation(const char *k) {
    static const char *const a[] = {"title", "description", "$schema", "$id", "$comment", "default",
                                    "examples", "deprecated", "readOnly", "writeOnly", "strict",
                                    "$defs", "definitions", NULL};
    for (int i = 0; a[i]; i++)
        if (!strcmp(a[i], k)) return true;
    return false;
}

static int nonneg_int(cctx *c, json_t *v, const char *kw, const char *ptr, int32_t *out) {
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > 1000000)
        return kp_errf(c->err, KP_EINVAL, "'%s' at %s must be a non-negative integer (at most 1000000)",
                       kw, *ptr ? ptr : "/");
    *out = (int32_t)json_integer_value(v);
    return 0;
}

/* The JSON text of a value, compact, for const/enum literals. */
static char *dump_lit(json_t *v) {
    return json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY | JSON_SORT_KEYS);
}

static bool type_matches(json_t *v, unsigned types) {
    /* types bit: 1 object, 2 array, 4 string, 8 number, 16 integer, 32 boolean, 64 null */
    if (!types) return true;
    if (json_is_object(v)) return types & 1;
    if (json_is_array(v)) return types & 2;
    if (json_is_string(v)) return types & 4;
    if (json_is_integer(v)) return types & (8 | 16);
    if (json_is_real(v)) {
        double d = json_real_value(v);
        return (types & 8) || ((types & 16) && d == floor(d));
    }
    if (json_is_boolean(v)) return types & 32;
    if (json_is_null(v)) return types & 64;
    return false;
}

static int type_bit(const char *t) {
    static const char *const names[] = {"object", "array", "string", "number", "integer", "boolean", "null"};
    for (int i = 0; i < 7; i++)
        if (!strcmp(t, names[i])) return 1 << i;
    return 0;
}

static int compile_obj(cctx *c, json_t *js, char *ptr, size_t plen, int32_t *out) {
    gram *g = c->g;
    json_t *props = json_object_get(js, "properties");
    json_t *req = json_object_get(js, "required");
    json_t *ap = json_object_get(js, "additionalProperties");
    if (props && !json_is_object(props))
        return kp_errf(c->err, KP_EINVAL, "'properties' at %s must be an object", *ptr ? ptr : "/");
    if (req && !json_is_array(req))
        return kp_errf(c->err, KP_EINVAL, "'required' at %s must be an array of strings", *ptr ? ptr : "/");
    size_t np = props ? json_object_size(props) : 0;
    if (np > GRAM_MAX_PROPS)
        return kp_errf(c->err, KP_EUNSUP, "'properties' at %s has %zu entries (at most %d supported)",
                       *ptr ? ptr : "/", np, GRAM_MAX_PROPS);
    int id = new_node(g, GN_OBJ);
    if (id < 0) return id;
    int32_t *pn = np ? calloc(np, sizeof(int32_t)) : NULL;
    if (np && !pn) return KP_ENOMEM;
    g->nodes[id].prop_node = pn;
    g->nodes[id].n_props = (int)np;
    const char *key;
    json_t *val;
    int i = 0;
    size_t pl = ptr_push(ptr, plen, "properties");
    json_object_foreach(props, key, val) {
        json_t *ks = json_string(key);
        if (!ks) return KP_ENOMEM;
        char *lit = json_dumps(ks, JSON_ENCODE_ANY);
        json_decref(ks);
        if (!lit) return KP_ENOMEM;
        int rc = add_lit(&g->nodes[id], lit, strlen(lit), i);
        free(lit);
        if (rc == KP_ERANGE)
            return kp_errf(c->err, KP_EUNSUP, "a property name at %s is longer than %d bytes", *ptr ? ptr : "/",
                           GRAM_MAX_LITERAL);
        if (rc) return rc;
        size_t kl = ptr_push(ptr, pl, key);
        int32_t child;
        rc = compile(c, val, ptr, kl, &child);
        ptr[pl] = 0;
        if (rc) return rc;
        g->nodes[id].prop_node[i] = child;
        i++;
    }
    ptr[plen] = 0;
    if (req) {
        size_t k;
        json_t *r;
        json_array_foreach(req, k, r) {
            if (!json_is_string(r))
                return kp_errf(c->err, KP_EINVAL, "'required' at %s must be an array of strings",
                               *ptr ? ptr : "/");
            const char *name = json_string_value(r);
            int found = -1, j = 0;
            json_object_foreach(props, key, val) {
                if (!strcmp(key, name)) found = j;
                j++;
            }
            if (found < 0)
                return kp_errf(c->err, KP_EUNSUP,
                               "'required' at %s names '%s', which is not in 'properties' (not supported)",
                               *ptr ? ptr : "/", name);
            g->nodes[id].required |= 1ull << found;
        }
    }
    int32_t addl = -1;
    if (!ap) addl = props ? -1 : N_ANY;
    else if (json_is_false(ap)) addl = -1;
    else if (json_is_true(ap)) addl = N_ANY;
    else if (json_is_object(ap)) {
        size_t al = ptr_push(ptr, plen, "additionalProperties");
        int rc = compile(c, ap, ptr, al, &addl);
        ptr[plen] = 0;
        if (rc) return rc;
    } else
        return kp_errf(c->err, KP_EINVAL, "'additionalProperties' at %s must be a boolean or a schema",
                       *ptr ? ptr : "/");
    g->nodes[id].addl = addl;
    qsort(g->nodes[id].lits, (size_t)g->nodes[id].n_lits, sizeof(glit), lit_cmp);
    *out = id;
    return 0;
}

static int compile_arr(cctx *c, json_t *js, char *ptr, size_t plen, int32_t *out) {
    gram *g = c->g;
    json_t *items = json_object_get(js, "items");
    json_t *pre = json_object_get(js, "prefixItems");
    json_t *mn = json_object_get(js, "minItems"), *mx = json_object_get(js, "maxItems");
    int32_t mi = 0, ma = -1;
    int rc;
    if (mn && (rc = nonneg_int(c, mn, "minItems", ptr, &mi))) return rc;
    if (mx && (rc = nonneg_int(c, mx, "maxItems", ptr, &ma))) return rc;
    if (ma >= 0 && mi > ma)
        return kp_errf(c->err, KP_EINVAL, "'minItems' %d > 'maxItems' %d at %s", mi, ma, *ptr ? ptr : "/");
    if (pre && !json_is_array(pre))
        return kp_errf(c->err, KP_EINVAL, "'prefixItems' at %s must be an array of schemas", *ptr ? ptr : "/");
    if (items && json_is_array(items))
        return kp_errf(c->err, KP_EUNSUP, "'items' as an array at %s is not supported (use 'prefixItems')",
                       *ptr ? ptr : "/");
    int id = new_node(g, GN_ARR);
    if (id < 0) return id;
    g->nodes[id].min_items = mi;
    g->nodes[id].max_items = ma;
    size_t n = pre ? json_array_size(pre) : 0;
    if (n) {
        int32_t *p = calloc(n, sizeof(int32_t));
        if (!p) return KP_ENOMEM;
        g->nodes[id].prefix = p;
        g->nodes[id].n_prefix = (int)n;
        size_t pl = ptr_push(ptr, plen, "prefixItems");
        for (size_t k = 0; k < n; k++) {
            char num[24];
            snprintf(num, sizeof num, "%zu", k);
            size_t kl = ptr_push(ptr, pl, num);
            int32_t ch;
            rc = compile(c, json_array_get(pre, k), ptr, kl, &ch);
            ptr[pl] = 0;
            if (rc) return rc;
            g->nodes[id].prefix[k] = ch;
        }
        ptr[plen] = 0;
    }
    int32_t it = N_ANY;
    if (items) {
        if (json_is_false(items)) it = -1;
        else {
            size_t il = ptr_push(ptr, plen, "items");
            rc = compile(c, items, ptr, il, &it);
            ptr[plen] = 0;
            if (rc) return rc;
        }
    }
    g->nodes[id].items = it;
    if (it < 0 && mi > (int32_t)n)
        return kp_errf(c->err, KP_EINVAL, "'minItems' %d at %s needs more items than 'prefixItems' allows",
                       mi, *ptr ? ptr : "/");
    *out = id;
    return 0;
}

static int compile_str(cctx *c, json_t *js, char *ptr, int32_t *out) {
    gram *g = c->g;
    json_t *mn = json_object_get(js, "minLength"), *mx = json_object_get(js, "maxLength");
    json_t *fm = json_object_get(js, "format");
    int32_t mi = 0, ma = -1;
    int rc, fmt = FMT_NONE;
    if (mn && (rc = nonneg_int(c, mn, "minLength", ptr, &mi))) return rc;
    if (mx && (rc = nonneg_int(c, mx, "maxLength", ptr, &ma))) return rc;
    if (ma >= 0 && mi > ma)
        return kp_errf(c->err, KP_EINVAL, "'minLength' %d > 'maxLength' %d at %s", mi, ma, *ptr ? ptr : "/");
    if (fm) {
        const char *f = json_string_value(fm);
        if (!f) return kp_errf(c->err, KP_EINVAL, "'format' at %s must be a string", *ptr ? ptr : "/");
        if (!strcmp(f, "date")) fmt = FMT_DATE;
        else if (!strcmp(f, "date-time")) fmt = FMT_DATETIME;
        else if (!strcmp(f, "uuid")) fmt = FMT_UUID;
        else
            return kp_errf(c->err, KP_EUNSUP,
                           "unsupported keyword 'format' value '%s' at %s (supported: date, date-time, uuid)", f,
                           *ptr ? ptr : "/");
        if (mn || mx)
            return kp_errf(c->err, KP_EUNSUP, "'minLength'/'maxLength' together with 'format' at %s is not supported",
                           *ptr ? ptr : "/");
    }
    if (!mn && !mx && !fm) {
        *out = N_STRING;
        return 0;
    }
    int id = new_node(g, GN_STR);
    if (id < 0) return id;
    g->nodes[id].min_len = mi;
    g->nodes[id].max_len = ma;
    g->nodes[id].fmt = fmt;
    *out = id;
    return 0;
}

/* enum / const: a literal set, values filtered by `type` when given. */
static int compile_lits(cctx *c, json_t *vals, unsigned types, const char *kw, char *ptr, int32_t *out) {
    gram *g = c->g;
    int id = new_node(g, GN_LIT);
    if (id < 0) return id;
    size_t k;
    json_t *v;
    json_array_foreach(vals, k, v) {
        if (!type_matches(v, types)) continue;
        char *s = dump_lit(v);
        if (!s) return KP_ENOMEM;
        bool dup = false;
        for (int i = 0; i < g->nodes[id].n_lits; i++)
            if (g->nodes[id].lits[i].len == strlen(s) && !memcmp(g->nodes[id].lits[i].s, s, strlen(s))) dup = true;
        int rc = dup ? 0 : add_lit(&g->nodes[id], s, strlen(s), (int32_t)k);
        free(s);
        if (rc == KP_ERANGE)
            return kp_errf(c->err, KP_EUNSUP, "'%s' at %s: at most %d values of at most %d bytes of JSON each", kw,
                           *ptr ? ptr : "/", GRAM_MAX_ENUM, GRAM_MAX_LITERAL);
        if (rc) return rc;
    }
    if (!g->nodes[id].n_lits)
        return kp_errf(c->err, KP_EINVAL, "'%s' at %s allows no value (empty, or none of its values has the 'type')",
                       kw, *ptr ? ptr : "/");
    qsort(g->nodes[id].lits, (size_t)g->nodes[id].n_lits, sizeof(glit), lit_cmp);
    *out = id;
    return 0;
}

static int compile_inner(cctx *c, json_t *js, char *ptr, size_t plen, int32_t *out) {
    gram *g = c->g;
    if (json_is_true(js)) {
        *out = N_ANY;
        return 0;
    }
    if (json_is_false(js))
        return kp_errf(c->err, KP_EINVAL, "the schema 'false' at %s allows no value", *ptr ? ptr : "/");
    if (!json_is_object(js))
        return kp_errf(c->err, KP_EINVAL, "the schema at %s must be an object or a boolean", *ptr ? ptr : "/");
    /* every keyword must be known */
    static const char *const known[] = {"type", "properties", "required", "additionalProperties", "enum",
                                        "const", "items", "prefixItems", "minItems", "maxItems", "anyOf",
                                        "oneOf", "$ref", "minLength", "maxLength", "format", NULL};
    const char *key;
    json_t *val;
    json_object_foreach(js, key, val) {
        if (is_annotation(key)) continue;
        bool ok = false;
        for (int i = 0; known[i]; i++)
            if (!strcmp(known[i], key)) ok = true;
        if (!ok)
            return kp_errf(c->err, KP_EUNSUP, "unsupported keyword '%s' at %s", key, *ptr ? ptr : "/");
    }
    json_t *ref = json_object_get(js, "$ref");
    if (ref) {
        if (!json_is_string(ref))
            return kp_errf(c->err, KP_EINVAL, "'$ref' at %s must be a string", *ptr ? ptr : "/");
        json_object_foreach(js, key, val) if (strcmp(key, "$ref") && !is_annotation(key)) return kp_errf(
            c->err, KP_EUNSUP, "keyword '%s' next to '$ref' at %s is not supported", key, *ptr ? ptr : "/");
        const char *r = json_string_value(ref);
        json_t *t = resolve_ref(c->root, r);
        if (!t || (strncmp(r, "#/$defs/", 8) && strncmp(r, "#/definitions/", 14) && strcmp(r, "#")))
            return kp_errf(c->err, t ? KP_EUNSUP : KP_EINVAL,
                           "'$ref' '%s' at %s %s (only \"#\", \"#/$defs/...\" and \"#/definitions/...\")", r,
                           *ptr ? ptr : "/", t ? "is not supported" : "does not resolve");
        char sub[256];
        snprintf(sub, sizeof sub, "%s", r + 1);
        return compile(c, t, sub, strlen(sub), out);
    }
    json_t *any = json_object_get(js, "anyOf");
    const char *anykw = "anyOf";
    if (!any) {
        any = json_object_get(js, "oneOf");
        anykw = "oneOf";
    }
    if (any) {
        if (!json_is_array(any) || !json_array_size(any))
            return kp_errf(c->err, KP_EINVAL, "'%s' at %s must be a non-empty array of schemas", anykw,
                           *ptr ? ptr : "/");
        if (json_array_size(any) > GRAM_MAX_ANYOF)
            return kp_errf(c->err, KP_EUNSUP, "'%s' at %s has %zu schemas (at most %d supported)", anykw,
                           *ptr ? ptr : "/", json_array_size(any), GRAM_MAX_ANYOF);
        if (json_object_get(js, "anyOf") && json_object_get(js, "oneOf"))
            return kp_errf(c->err, KP_EUNSUP, "'anyOf' together with 'oneOf' at %s is not supported", *ptr ? ptr : "/");
        json_object_foreach(js, key, val) if (strcmp(key, anykw) && !is_annotation(key)) return kp_errf(
            c->err, KP_EUNSUP, "keyword '%s' next to '%s' at %s is not supported", key, anykw, *ptr ? ptr : "/");
        int id = new_node(g, GN_ALT);
        if (id < 0) return id;
        size_t al = ptr_push(ptr, plen, anykw);
        size_t k;
        json_array_foreach(any, k, val) {
            char num[24];
            snprintf(num, sizeof num, "%zu", k);
            size_t kl = ptr_push(ptr, al, num);
            int32_t ch;
            int rc = compile(c, val, ptr, kl, &ch);
            ptr[al] = 0;
            if (rc) return rc;
            if (add_alt(&g->nodes[id], ch)) return KP_ENOMEM;
        }
        ptr[plen] = 0;
        *out = id;
        return 0;
    }
    /* type */
    unsigned types = 0;
    json_t *ty = json_object_get(js, "type");
    if (ty) {
        if (json_is_string(ty)) {
            types = (unsigned)type_bit(json_string_value(ty));
            if (!types)
                return kp_errf(c->err, KP_EINVAL, "'type' '%s' at %s is not a JSON Schema type",
                               json_string_value(ty), *ptr ? ptr : "/");
        } else if (json_is_array(ty) && json_array_size(ty)) {
            size_t k;
            json_array_foreach(ty, k, val) {
                int b = json_is_string(val) ? type_bit(json_string_value(val)) : 0;
                if (!b)
                    return kp_errf(c->err, KP_EINVAL, "'type' at %s lists something that is not a type name",
                                   *ptr ? ptr : "/");
                types |= (unsigned)b;
            }
        } else
            return kp_errf(c->err, KP_EINVAL, "'type' at %s must be a type name or a non-empty list of them",
                           *ptr ? ptr : "/");
    }
    json_t *en = json_object_get(js, "enum"), *cn = json_object_get(js, "const");
    if (en || cn) {
        if (en && !json_is_array(en))
            return kp_errf(c->err, KP_EINVAL, "'enum' at %s must be an array", *ptr ? ptr : "/");
        json_t *vals = en;
        json_t *tmp = NULL;
        if (cn) {
            tmp = json_array();
            json_array_append(tmp, cn);
            vals = tmp;
            if (en) { /* const and enum: the const, if the enum has it */
                bool in = false;
                size_t k;
                json_array_foreach(en, k, val) if (json_equal(val, cn)) in = true;
                if (!in) {
                    json_decref(tmp);
                    return kp_errf(c->err, KP_EINVAL, "'const' at %s is not one of the 'enum' values",
                                   *ptr ? ptr : "/");
                }
            }
        }
        int rc = compile_lits(c, vals, types, cn ? "const" : "enum", ptr, out);
        json_decref(tmp);
        return rc;
    }
    /* infer the type from the keywords when absent */
    if (!ty) {
        if (json_object_get(js, "properties") || json_object_get(js, "required") ||
            json_object_get(js, "additionalProperties"))
            types |= 1;
        if (json_object_get(js, "items") || json_object_get(js, "prefixItems") || json_object_get(js, "minItems") ||
            json_object_get(js, "maxItems"))
            types |= 2;
        if (json_object_get(js, "minLength") || json_object_get(js, "maxLength") || json_object_get(js, "format"))
            types |= 4;
        if (!types) {
            *out = N_ANY;
            return 0;
        }
    }
    int32_t parts[7];
    int np = 0, rc;
    if (types & 1) {
        if ((rc = compile_obj(c, js, ptr, plen, &parts[np++]))) return rc;
    }
    if (types & 2) {
        if ((rc = compile_arr(c, js, ptr, plen, &parts[np++]))) return rc;
    }
    if (types & 4) {
        if ((rc = compile_str(c, js, ptr, &parts[np++]))) return rc;
    }
    if (types & 8) parts[np++] = N_NUMBER;
    else if (types & 16) {
        int id = new_node(g, GN_NUM);
        if (id < 0) return id;
        g->nodes[id].integer = true;
        parts[np++] = id;
    }
    if (types & (32 | 64)) {
        int id = new_node(g, GN_LIT);
        if (id < 0) return id;
        if ((types & 32) && (add_lit(&g->nodes[id], "true", 4, -1) || add_lit(&g->nodes[id], "false", 5, -1)))
            return KP_ENOMEM;
        if ((types & 64) && add_lit(&g->nodes[id], "null", 4, -1)) return KP_ENOMEM;
        qsort(g->nodes[id].lits, (size_t)g->nodes[id].n_lits, sizeof(glit), lit_cmp);
        parts[np++] = id;
    }
    if (np == 1) {
        *out = parts[0];
        return 0;
    }
    int id = new_node(g, GN_ALT);
    if (id < 0) return id;
    for (int i = 0; i < np; i++)
        if (add_alt(&g->nodes[id], parts[i])) return KP_ENOMEM;
    *out = id;
    return 0;
}

static int compile(cctx *c, json_t *js, char *ptr, size_t plen, int32_t *out) {
    for (int i = 0; i < c->n_memo; i++)
        if (c->memo[i].js == js) {
            *out = c->memo[i].node;
            return 0;
        }
    if (++c->depth > 64) return kp_errf(c->err, KP_EUNSUP, "the schema nests deeper than 64 at %s", ptr);
    /* Allocate an ALT node with one alternative first so a recursive $ref to
     * this schema resolves to it while it is being compiled. */
    int id = new_node(c->g, GN_ALT);
    if (id < 0) return id;
    if (memo_add(c, js, id)) return KP_ENOMEM;
    int32_t inner;
    int rc = compile_inner(c, js, ptr, plen, &inner);
    c->depth--;
    if (rc) return rc;
    if (add_alt(&c->g->nodes[id], inner)) return KP_ENOMEM;
    *out = id;
    return 0;
}

int gram_compile(gram **out, const char *schema, size_t len, kp_err *err) {
    if (!out || !schema) return kp_errf(err, KP_EINVAL, "gram_compile: NULL argument");
    *out = NULL;
    json_error_t je;
    json_t *js = json_loadb(schema, len, JSON_DECODE_ANY, &je);
    if (!js) return kp_errf(err, KP_EINVAL, "the schema is not valid JSON: %s", je.text);
    gram *g = calloc(1, sizeof *g);
    int rc = g ? builtins(g) : KP_ENOMEM;
    if (!rc) {
        cctx c = {.g = g, .root = js, .err = err};
        char ptr[256] = "";
        rc = compile(&c, js, ptr, 0, &g->root);
        free(c.memo);
    }
    json_decref(js);
    if (rc) {
        if (rc == KP_ENOMEM) kp_errf(err, rc, "grammar: out of memory");
        gram_free(g);
        return rc;
    }
    *out = g;
    return 0;
}

int gram_compile_json_object(gram **out, kp_err *err) {
    if (!out) return kp_errf(err, KP_EINVAL, "gram_compile_json_object: NULL argument");
    gram *g = calloc(1, sizeof *g);
    if (!g || builtins(g)) {
        gram_free(g);
        return kp_errf(err, KP_ENOMEM, "grammar: out of memory");
    }
    g->root = N_ANYOBJ;
    *out = g;
    return 0;
}

/* ------------------------------------------------------------------ */
/* the automaton                                                       */

enum { F_VAL, F_OBJ, F_ARR, F_STR, F_NUM, F_LIT, F_FMT };
enum { O_KEY_OR_END, O_KEY, O_INKEY, O_COLON, O_INVAL, O_AFTER };
enum { A_ITEM_OR_END, A_INITEM, A_AFTER };
enum { S_NORM, S_ESC, S_HEX, S_UTF };

typedef struct gframe {
    uint8_t kind, phase;
    uint16_t x;
    int32_t node;
    uint32_t a, b;
    uint64_t seen;
} gframe;

typedef struct gthread {
    uint8_t depth, ws;
    uint16_t pad;
    gframe f[GRAM_MAX_DEPTH];
} gthread;

typedef struct gset {
    int n;
    gthread t[GRAM_MAX_THREADS];
} gset;

#define THREAD_BYTES(t) (offsetof(gthread, f) + sizeof(gframe) * (t)->depth)

static void emit(gset *out, const gthread *t) {
    size_t nb = THREAD_BYTES(t);
    for (int i = 0; i < out->n; i++)
        if (out->t[i].depth == t->depth && !memcmp(&out->t[i], t, nb)) return;
    if (out->n == GRAM_MAX_THREADS) return; /* dropping a parse never admits invalid output */
    memcpy(&out->t[out->n++], t, nb);
}

static bool is_ws(int c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r'; }

static gframe *push(gthread *t, int kind, int32_t node) {
    if (t->depth >= GRAM_MAX_DEPTH) return NULL;
    gframe *f = &t->f[t->depth++];
    memset(f, 0, sizeof *f);
    f->kind = (uint8_t)kind;
    f->node = node;
    return f;
}

/* The value on top is complete: pop it and tell the parent. result: the
 * property index for a known key, -1 otherwise. */
static void pop_value(const gram *g, gthread *t, int result) {
    t->depth--;
    if (!t->depth) return;
    gframe *p = &t->f[t->depth - 1];
    const gnode *n = &g->nodes[p->node];
    if (p->kind == F_OBJ) {
        if (p->phase == O_INKEY) {
            if (result >= 0) {
                p->seen |= 1ull << result;
                p->a = (uint32_t)n->prop_node[result];
            } else p->a = (uint32_t)n->addl;
            p->phase = O_COLON;
        } else p->phase = O_AFTER;
    } else if (p->kind == F_ARR) {
        p->a++;
        p->phase = A_AFTER;
    }
}

static bool lit_valid(const gthread *t, const gframe *f, const glit *l) {
    if (f->phase == 1 && t->depth >= 2) { /* object keys (a key frame sits on its object's): not yet seen */
        const gframe *p = &t->f[t->depth - 2];
        return !(p->seen & (1ull << l->payload));
    }
    return true;
}

/* A complete valid literal in the range (len == pos), or NULL. */
static const glit *lit_complete(const gram *g, const gthread *t, const gframe *f) {
    const gnode *n = &g->nodes[f->node];
    for (uint32_t i = f->a; i < f->b; i++)
        if (n->lits[i].len == f->x && lit_valid(t, f, &n->lits[i])) return &n->lits[i];
    return NULL;
}

static bool may_end(const gram *g, const gthread *t) {
    const gframe *f = &t->f[t->depth - 1];
    if (f->kind == F_NUM) return f->phase == 2 || f->phase == 3 || f->phase == 5 || f->phase == 8;
    if (f->kind == F_LIT) return lit_complete(g, t, f) != NULL;
    return false;
}

static bool obj_more_keys(const gnode *n, const gframe *f) {
    if (n->addl >= 0) return true;
    uint64_t all = n->n_props >= 64 ? ~0ull : ((1ull << n->n_props) - 1);
    return (f->seen & all) != all;
}

static int hexval(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static bool leap(uint32_t y) { return (y % 4 == 0 && y % 100 != 0) || y % 400 == 0; }

/* One byte of a formatted string (after its opening quote). f->a = pos,
 * f->b = year, f->seen = month, f->x = the previous field digit. Returns
 * 1 consumed, 2 string closed, 0 rejected. */
static int fmt_step(const gnode *n, gframe *f, int c) {
    uint32_t p = f->a;
    bool dig = c >= '0' && c <= '9';
    int d = c - '0';
    if (n->fmt == FMT_UUID) {
        if (p == 36) return c == '"' ? 2 : 0;
        if (p == 8 || p == 13 || p == 18 || p == 23) {
            if (c != '-') return 0;
        } else if (hexval(c) < 0) return 0;
        f->a++;
        return 1;
    }
    uint32_t end = n->fmt == FMT_DATE ? 10 : 25;
    if (p == end) return c == '"' ? 2 : 0;
    switch (p) {
    case 0: case 1: case 2: case 3:
        if (!dig) return 0;
        f->b = f->b * 10 + (uint32_t)d;
        break;
    case 4: case 7: if (c != '-') return 0; break;
    case 5: if (!dig || d > 1) return 0; f->x = (uint16_t)d; break;
    case 6:
        if (!dig || (f->x == 0 && d == 0) || (f->x == 1 && d > 2)) return 0;
        f->seen = f->x * 10u + (uint32_t)d;
        break;
    case 8: if (!dig || d > 3 || (d == 3 && f->seen == 2)) return 0; f->x = (uint16_t)d; break;
    case 9:
        if (!dig) return 0;
        if (f->x == 0 && d == 0) return 0;
        if (f->x == 2 && d == 9 && f->seen == 2 && !leap(f->b)) return 0;
        if (f->x == 3) {
            uint64_t m = f->seen;
            bool m31 = m == 1 || m == 3 || m == 5 || m == 7 || m == 8 || m == 10 || m == 12;
            if (d > 1 || (d == 1 && !m31)) return 0;
        }
        break;
    case 10: if (c != 'T') return 0; break;
    case 11: case 20: if (!dig || d > 2) return 0; f->x = (uint16_t)d; break;
    case 12: case 21: if (!dig || (f->x == 2 && d > 3)) return 0; break;
    case 13: case 16: case 22: if (c != ':') return 0; break;
    case 14: case 17: case 23: if (!dig || d > 5) return 0; break;
    case 15: case 18: case 24: if (!dig) return 0; break;
    case 19:
        if (c == 'Z') {
            f->a = 25;
            return 1;
        }
        if (c != '+' && c != '-') return 0;
        break;
    default: return 0;
    }
    f->a++;
    return 1;
}

static void step(const gram *g, const gthread *in, int c, gset *out, int eps);

/* Exclusion of declared names in an additional key (F_STR.seen): on, still
 * matching some declared key's bytes, range lo/hi of the parent object's key
 * literals and the position in them. */
#define EXCL_ON (1ull << 63)
#define EXCL_MATCH (1ull << 62)

/* Track byte c of an additional key; false to reject it. */
static bool excl_byte(const gram *g, const gthread *t, gframe *f, int c) {
    if (!(f->seen & EXCL_ON)) return true;
    if (c == '\\') return false; /* escapes could spell a declared key */
    if (!(f->seen & EXCL_MATCH)) return true;
    const gnode *o = &g->nodes[t->f[t->depth - 2].node];
    uint32_t lo = (uint32_t)(f->seen & 0xFFFFF), hi = (uint32_t)((f->seen >> 20) & 0xFFFFF);
    uint32_t pos = (uint32_t)((f->seen >> 40) & 0xFFFF), nlo = hi, nhi = hi;
    for (uint32_t i = lo; i < hi; i++)
        if (o->lits[i].len > pos && (uint8_t)o->lits[i].s[pos] == c) {
            if (nlo == hi) nlo = i;
            nhi = i + 1;
        }
    if (nlo == nhi) f->seen = EXCL_ON;
    else f->seen = EXCL_ON | EXCL_MATCH | nlo | ((uint64_t)nhi << 20) | ((uint64_t)(pos + 1) << 40);
    return true;
}

/* At the closing quote: true when the key spells a declared one. */
static bool excl_hit(const gram *g, const gthread *t, const gframe *f) {
    if ((f->seen & (EXCL_ON | EXCL_MATCH)) != (EXCL_ON | EXCL_MATCH)) return false;
    const gnode *o = &g->nodes[t->f[t->depth - 2].node];
    uint32_t lo = (uint32_t)(f->seen & 0xFFFFF), hi = (uint32_t)((f->seen >> 20) & 0xFFFFF);
    uint32_t pos = (uint32_t)((f->seen >> 40) & 0xFFFF);
    for (uint32_t i = lo; i < hi; i++)
        if (o->lits[i].len == pos + 1 && o->lits[i].s[pos] == '"') return true;
    return false;
}

/* Feed c to thread t (a private copy); the results go to out. */
static void run(const gram *g, gthread *t, int c, gset *out, int eps) {
    for (;;) {
        if (!t->depth) return; /* nothing may follow the value */
        gframe *f = &t->f[t->depth - 1];
        const gnode *n = &g->nodes[f->node];
        switch (f->kind) {
        case F_VAL:
            if (is_ws(c)) {
                if (t->ws >= GRAM_MAX_WS) return;
                t->ws++;
                emit(out, t);
                return;
            }
            switch (n->kind) {
            case GN_ALT:
                if (eps > 128) return; /* a $ref cycle that never consumes a byte */
                if (n->n_alts == 1) {
                    f->node = n->alts[0];
                    eps++;
                    continue;
                }
                for (int i = 0; i < n->n_alts; i++) {
                    gthread u;
                    memcpy(&u, t, THREAD_BYTES(t));
                    u.f[u.depth - 1].node = n->alts[i];
                    run(g, &u, c, out, eps + 1);
                }
                return;
            case GN_ANY:
                if (c == '{') f->node = N_ANYOBJ;
                else if (c == '[') f->node = N_ANYARR;
                else if (c == '"') f->node = N_STRING;
                else if (c == '-' || (c >= '0' && c <= '9')) f->node = N_NUMBER;
                else if (c == 't' || c == 'f' || c == 'n') f->node = N_TFN;
                else return;
                continue;
            case GN_OBJ:
                if (c != '{') return;
                f->kind = F_OBJ;
                f->phase = O_KEY_OR_END;
                t->ws = 0;
                emit(out, t);
                return;
            case GN_ARR:
                if (c != '[') return;
                f->kind = F_ARR;
                f->phase = A_ITEM_OR_END;
                t->ws = 0;
                emit(out, t);
                return;
            case GN_STR:
                if (c != '"') return;
                f->kind = n->fmt ? F_FMT : F_STR;
                f->phase = S_NORM;
                t->ws = 0;
                emit(out, t);
                return;
            case GN_NUM:
                f->kind = F_NUM;
                f->phase = 0;
                f->x = n->integer;
                t->ws = 0;
                continue;
            case GN_LIT:
                f->kind = F_LIT;
                f->phase = 0;
                f->a = 0;
                f->b = (uint32_t)n->n_lits;
                f->x = 0;
                t->ws = 0;
                continue;
            }
            return;
        case F_OBJ:
            if (is_ws(c) && f->phase != O_INKEY && f->phase != O_INVAL) {
                if (t->ws >= GRAM_MAX_WS) return;
                t->ws++;
                emit(out, t);
                return;
            }
            t->ws = 0;
            switch (f->phase) {
            case O_KEY_OR_END:
            case O_KEY:
                if (c == '}' && f->phase == O_KEY_OR_END) {
                    if ((f->seen & n->required) != n->required) return;
                    pop_value(g, t, -1);
                    emit(out, t);
                    return;
                }
                if (c != '"') return;
                {
                    uint64_t all = n->n_props >= 64 ? ~0ull : ((1ull << n->n_props) - 1);
                    if ((f->seen & all) != all) {
                        gthread u;
                        memcpy(&u, t, THREAD_BYTES(t));
                        u.f[u.depth - 1].phase = O_INKEY;
                        gframe *k = push(&u, F_LIT, f->node);
                        if (k) {
                            k->phase = 1;
                            k->a = 0;
                            k->b = (uint32_t)n->n_lits;
                            k->x = 1; /* every key literal starts with its quote */
                            emit(out, &u);
                        }
                    }
                    if (n->addl >= 0) {
                        f->phase = O_INKEY;
                        gframe *k = push(t, F_STR, N_STRING);
                        /* an additional key must not spell a declared one */
                        if (k && n->n_lits) k->seen = EXCL_ON | EXCL_MATCH | ((uint64_t)n->n_lits << 20) | (1ull << 40);
                        if (k) emit(out, t);
                    }
                }
                return;
            case O_COLON:
                if (c != ':') return;
                f->phase = O_INVAL;
                if (push(t, F_VAL, (int32_t)f->a)) emit(out, t);
                return;
            case O_AFTER:
                if (c == ',') {
                    if (!obj_more_keys(n, f)) return;
                    f->phase = O_KEY;
                    emit(out, t);
                    return;
                }
                if (c == '}') {
                    if ((f->seen & n->required) != n->required) return;
                    pop_value(g, t, -1);
                    emit(out, t);
                }
                return;
            }
            return;
        case F_ARR: {
            if (is_ws(c)) {
                if (t->ws >= GRAM_MAX_WS) return;
                t->ws++;
                emit(out, t);
                return;
            }
            int32_t cnt = (int32_t)f->a;
            int32_t item = cnt < n->n_prefix ? n->prefix[cnt] : n->items;
            bool more = item >= 0 && (n->max_items < 0 || cnt < n->max_items);
            if (c == ']') {
                if (cnt < n->min_items) return;
                t->ws = 0;
                pop_value(g, t, -1);
                emit(out, t);
                return;
            }
            if (f->phase == A_ITEM_OR_END) {
                if (!more) return;
                f->phase = A_INITEM;
                if (!push(t, F_VAL, item)) return;
                continue; /* the value starts with c */
            }
            if (c != ',' || !more) return;
            t->ws = 0;
            f->phase = A_INITEM;
            if (push(t, F_VAL, item)) emit(out, t);
            return;
        }
        case F_STR:
            switch (f->phase) {
            case S_NORM:
                if (c == '"') {
                    if ((int32_t)f->a < n->min_len || excl_hit(g, t, f)) return;
                    pop_value(g, t, -1);
                    emit(out, t);
                    return;
                }
                if (c < 0x20 || !excl_byte(g, t, f, c)) return;
                if (c < 0x80 || (c >= 0xC2 && c <= 0xF4)) {
                    if (n->max_len >= 0 && (int32_t)f->a >= n->max_len) return;
                    f->a++;
                }
                if (c == '\\') f->phase = S_ESC;
                else if (c < 0x80) {
                } else if (c >= 0xC2 && c <= 0xDF) {
                    f->phase = S_UTF;
                    f->x = 1;
                    f->b = 0x80BF;
                } else if (c >= 0xE0 && c <= 0xEF) {
                    f->phase = S_UTF;
                    f->x = 2;
                    f->b = c == 0xE0 ? 0xA0BF : c == 0xED ? 0x809F : 0x80BF;
                } else if (c >= 0xF0 && c <= 0xF4) {
                    f->phase = S_UTF;
                    f->x = 3;
                    f->b = c == 0xF0 ? 0x90BF : c == 0xF4 ? 0x808F : 0x80BF;
                } else return;
                emit(out, t);
                return;
            case S_UTF:
                if (c < (int)(f->b >> 8) || c > (int)(f->b & 0xFF) || !excl_byte(g, t, f, c)) return;
                f->b = 0x80BF;
                if (--f->x == 0) f->phase = S_NORM;
                emit(out, t);
                return;
            case S_ESC:
                if (c == 'u') {
                    f->phase = S_HEX;
                    f->x = 0;
                    f->b = 0;
                } else if (strchr("\"\\/bfnrt", c) && c) f->phase = S_NORM;
                else return;
                emit(out, t);
                return;
            case S_HEX: {
                int v = hexval(c);
                if (v < 0) return;
                if (f->x == 1 && f->b == 0xD && v >= 8) return; /* surrogates */
                if (f->x == 3 && f->b == 0 && v == 0) return;   /* \u0000 */
                f->b = f->b * 16 + (uint32_t)v;
                if (++f->x == 4) f->phase = S_NORM;
                emit(out, t);
                return;
            }
            }
            return;
        case F_FMT: {
            int r = fmt_step(n, f, c);
            if (!r) return;
            if (r == 2) pop_value(g, t, -1);
            emit(out, t);
            return;
        }
        case F_NUM: {
            bool dig = c >= '0' && c <= '9';
            bool integer = f->x;
            uint8_t ph = f->phase;
            int np = -1;
            if (ph == 0 && c == '-') np = 1;
            else if ((ph == 0 || ph == 1) && c == '0') np = 2;
            else if ((ph == 0 || ph == 1) && dig) np = 3, f->a = 0;
            else if (ph == 3 && dig && f->a < GRAM_MAX_DIGITS) np = 3;
            else if ((ph == 2 || ph == 3) && c == '.' && !integer) np = 4;
            else if ((ph == 2 || ph == 3 || ph == 5) && (c == 'e' || c == 'E') && !integer) np = 6;
            else if (ph == 4 && dig) np = 5, f->a = 0;
            else if (ph == 5 && dig && f->a < GRAM_MAX_DIGITS) np = 5;
            else if (ph == 6 && (c == '+' || c == '-')) np = 7;
            else if ((ph == 6 || ph == 7) && dig) np = 8, f->a = 0;
            else if (ph == 8 && dig && f->a < 2) np = 8;
            if (np >= 0) {
                if (np == 3 || np == 5 || np == 8) f->a++;
                f->phase = (uint8_t)np;
                emit(out, t);
                return;
            }
            if (!may_end(g, t)) return;
            pop_value(g, t, -1);
            continue; /* c belongs to the parent */
        }
        case F_LIT: {
            uint32_t lo = f->b, hi = f->b, pos = f->x;
            bool any = false;
            for (uint32_t i = f->a; i < f->b; i++) {
                const glit *l = &n->lits[i];
                if (l->len > pos && (uint8_t)l->s[pos] == c) {
                    if (lo == f->b) lo = i;
                    hi = i + 1;
                    if (lit_valid(t, f, l)) any = true;
                }
            }
            if (any) {
                f->a = lo;
                f->b = hi;
                f->x = (uint16_t)(pos + 1);
                /* end at once when nothing longer is possible */
                const glit *done = lit_complete(g, t, f);
                bool longer = false;
                for (uint32_t i = lo; i < hi && !longer; i++)
                    if (n->lits[i].len > f->x && lit_valid(t, f, &n->lits[i])) longer = true;
                if (done && !longer) pop_value(g, t, f->phase == 1 ? done->payload : -1);
                emit(out, t);
                return;
            }
            const glit *done = lit_complete(g, t, f);
            if (!done) return;
            pop_value(g, t, f->phase == 1 ? done->payload : -1);
            continue;
        }
        }
        return;
    }
}

static void step(const gram *g, const gthread *in, int c, gset *out, int eps) {
    gthread t;
    memcpy(&t, in, THREAD_BYTES(in));
    run(g, &t, c, out, eps);
}

static void set_step(const gram *g, const gset *in, int c, gset *out) {
    out->n = 0;
    for (int i = 0; i < in->n; i++) step(g, &in->t[i], c, out, 0);
}

static bool set_accepting(const gram *g, const gset *s) {
    for (int i = 0; i < s->n; i++)
        if (s->t[i].depth == 0 || (s->t[i].depth == 1 && may_end(g, &s->t[i]))) return true;
    return false;
}

static void set_copy(gset *dst, const gset *src) {
    dst->n = src->n;
    for (int i = 0; i < src->n; i++) memcpy(&dst->t[i], &src->t[i], THREAD_BYTES(&src->t[i]));
}

/* ------------------------------------------------------------------ */
/* token trie                                                          */

typedef struct trie {
    int32_t n_nodes;
    uint8_t *byte;     /* [n_nodes] edge byte into the node */
    uint16_t *depth;   /* [n_nodes] 1.. */
    int32_t *end;      /* [n_nodes] preorder index past the subtree */
    int32_t *tok0;     /* [n_nodes] first index into ids of tokens ending here */
    int32_t *ntok;     /* [n_nodes] */
    int32_t *ids;      /* tokens sorted by bytes */
} trie;

#define PLAIN_MAX 32

struct gram_vocab {
    int32_t n_vocab;
    int words;
    char *bytes;          /* all pieces */
    uint32_t *off, *len;  /* [n_vocab] */
    int max_len;
    trie full, nonplain;
    /* plain_le[r]: bitmask [words] of the plain string-content tokens of at
     * most r code points (r = 0..PLAIN_MAX); longer ones are in nonplain */
    uint32_t *plain_le[33];
    int32_t *eog;
    int n_eog;
};

static int cmp_tok_r(const void *a, const void *b, void *ud) {
    const gram_vocab *gv = ud;
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    uint32_t lx = gv->len[x], ly = gv->len[y];
    int c = memcmp(gv->bytes + gv->off[x], gv->bytes + gv->off[y], lx < ly ? lx : ly);
    if (c) return c;
    if (lx != ly) return lx < ly ? -1 : 1;
    return x < y ? -1 : x > y;
}

static void trie_free(trie *t) {
    free(t->byte);
    free(t->depth);
    free(t->end);
    free(t->tok0);
    free(t->ntok);
    free(t->ids);
    memset(t, 0, sizeof *t);
}

/* Build a preorder trie of the tokens ids[0..n) (sorted by bytes). */
static int trie_build(trie *t, const gram_vocab *gv, int32_t *ids, int32_t n) {
    size_t cap = 0;
    for (int32_t i = 0; i < n; i++) cap += gv->len[ids[i]];
    t->ids = ids;
    t->byte = malloc(cap + 1);
    t->depth = malloc(sizeof(uint16_t) * (cap + 1));
    t->end = malloc(sizeof(int32_t) * (cap + 1));
    t->tok0 = malloc(sizeof(int32_t) * (cap + 1));
    t->ntok = malloc(sizeof(int32_t) * (cap + 1));
    int32_t *stack = malloc(sizeof(int32_t) * ((size_t)gv->max_len + 2));
    if (!t->byte || !t->depth || !t->end || !t->tok0 || !t->ntok || !stack) {
        free(stack);
        return KP_ENOMEM;
    }
    int32_t nn = 0, sd = 0; /* stack[d-1] = node at depth d on the current path */
    const char *prev = NULL;
    uint32_t plen = 0;
    for (int32_t i = 0; i < n; i++) {
        const char *s = gv->bytes + gv->off[ids[i]];
        uint32_t l = gv->len[ids[i]];
        uint32_t lcp = 0;
        while (prev && lcp < l && lcp < plen && s[lcp] == prev[lcp]) lcp++;
        while ((uint32_t)sd > lcp) t->end[stack[--sd]] = nn;
        for (uint32_t k = lcp; k < l; k++) {
            t->byte[nn] = (uint8_t)s[k];
            t->depth[nn] = (uint16_t)(k + 1);
            t->tok0[nn] = 0;
            t->ntok[nn] = 0;
            stack[sd++] = nn++;
        }
        int32_t last = stack[sd - 1];
        if (!t->ntok[last]) t->tok0[last] = i;
        t->ntok[last]++;
        prev = s;
        plen = l;
    }
    while (sd > 0) t->end[stack[--sd]] = nn;
    free(stack);
    t->n_nodes = nn;
    return 0;
}

/* Plain string content: complete valid UTF-8, no control byte, quote or
 * backslash; returns the code point count, or -1. */
static int plain_chars(const uint8_t *s, uint32_t n) {
    int chars = 0;
    for (uint32_t i = 0; i < n;) {
        uint8_t c = s[i];
        int k;
        uint8_t lo = 0x80, hi = 0xBF;
        if (c < 0x20 || c == '"' || c == '\\') return -1;
        if (c < 0x80) k = 0;
        else if (c >= 0xC2 && c <= 0xDF) k = 1;
        else if (c >= 0xE0 && c <= 0xEF) {
            k = 2;
            if (c == 0xE0) lo = 0xA0;
            if (c == 0xED) hi = 0x9F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            k = 3;
            if (c == 0xF0) lo = 0x90;
            if (c == 0xF4) hi = 0x8F;
        } else return -1;
        if (i + 1 + (uint32_t)k > n) return -1;
        for (int j = 1; j <= k; j++) {
            uint8_t d = s[i + (uint32_t)j];
            if (d < lo || d > hi) return -1;
            lo = 0x80;
            hi = 0xBF;
        }
        i += 1 + (uint32_t)k;
        chars++;
    }
    return chars;
}

void gram_vocab_free(gram_vocab *gv) {
    if (!gv) return;
    trie_free(&gv->full);
    trie_free(&gv->nonplain);
    free(gv->bytes);
    free(gv->off);
    free(gv->len);
    for (int r = 0; r <= PLAIN_MAX; r++) free(gv->plain_le[r]);
    free(gv->eog);
    free(gv);
}

int32_t gram_vocab_n(const gram_vocab *gv) { return gv ? gv->n_vocab : 0; }

int gram_vocab_new(gram_vocab **out, const tok_vocab *v, kp_err *err) {
    if (!out || !v) return kp_errf(err, KP_EINVAL, "gram_vocab_new: NULL argument");
    *out = NULL;
    int32_t n = tok_n_vocab(v);
    gram_vocab *gv = calloc(1, sizeof *gv);
    if (!gv) return kp_errf(err, KP_ENOMEM, "grammar: out of memory");
    gv->n_vocab = n;
    gv->words = (n + 31) / 32;
    gv->off = calloc((size_t)n, sizeof(uint32_t));
    gv->len = calloc((size_t)n, sizeof(uint32_t));
    bool plain_ok = true;
    for (int r = 0; r <= PLAIN_MAX; r++)
        if (!(gv->plain_le[r] = calloc((size_t)gv->words, sizeof(uint32_t)))) plain_ok = false;
    gv->eog = calloc((size_t)n, sizeof(int32_t));
    int32_t *all = malloc(sizeof(int32_t) * (size_t)n), *np = malloc(sizeof(int32_t) * (size_t)n);
    size_t total = 0;
    for (int32_t i = 0; i < n; i++) {
        int l = tok_piece(v, i, false, NULL, 0);
        total += l > 0 ? (size_t)l : 0;
    }
    gv->bytes = malloc(total + 1);
    if (!gv->off || !gv->len || !plain_ok || !gv->eog || !all || !np || !gv->bytes) {
        free(all);
        free(np);
        gram_vocab_free(gv);
        return kp_errf(err, KP_ENOMEM, "grammar: out of memory for the token trie (%d tokens)", n);
    }
    size_t o = 0;
    int32_t na = 0, nnp = 0;
    for (int32_t i = 0; i < n; i++) {
        if (tok_is_eog(v, i)) gv->eog[gv->n_eog++] = i;
        int l = tok_piece(v, i, false, gv->bytes + o, total - o);
        if (l <= 0 || tok_type(v, i) == TOK_TYPE_CONTROL || tok_type(v, i) == TOK_TYPE_UNKNOWN) continue;
        gv->off[i] = (uint32_t)o;
        gv->len[i] = (uint32_t)l;
        o += (size_t)l;
        if (l > gv->max_len) gv->max_len = l;
        all[na++] = i;
        int pc = plain_chars((const uint8_t *)gv->bytes + gv->off[i], (uint32_t)l);
        if (pc >= 0 && pc <= PLAIN_MAX) {
            for (int r = pc; r <= PLAIN_MAX; r++) gv->plain_le[r][i / 32] |= 1u << (i % 32);
        } else np[nnp++] = i;
    }
    qsort_r(all, (size_t)na, sizeof(int32_t), cmp_tok_r, gv);
    qsort_r(np, (size_t)nnp, sizeof(int32_t), cmp_tok_r, gv);
    if (trie_build(&gv->full, gv, all, na) || trie_build(&gv->nonplain, gv, np, nnp)) {
        gram_vocab_free(gv);
        return kp_errf(err, KP_ENOMEM, "grammar: out of memory for the token trie (%d tokens)", n);
    }
    *out = gv;
    return 0;
}

/* ------------------------------------------------------------------ */
/* state                                                               */

struct gram_state {
    const gram *g;
    const gram_vocab *gv;
    gset cur;
    gset *levels; /* [max_len + 1], for the mask walk */
    gset tmp, tmp2;
};

int gram_state_new(gram_state **out, const gram *g, const gram_vocab *gv, kp_err *err) {
    if (!out || !g) return kp_errf(err, KP_EINVAL, "gram_state_new: NULL argument");
    gram_state *s = calloc(1, sizeof *s);
    if (!s) return kp_errf(err, KP_ENOMEM, "grammar: out of memory");
    s->g = g;
    s->gv = gv;
    s->cur.n = 1;
    s->cur.t[0].depth = 1;
    memset(&s->cur.t[0].f[0], 0, sizeof(gframe));
    s->cur.t[0].f[0].kind = F_VAL;
    s->cur.t[0].f[0].node = g->root;
    *out = s; /* the walk's levels are allocated by the first gram_mask */
    return 0;
}

void gram_state_free(gram_state *s) {
    if (!s) return;
    free(s->levels);
    free(s);
}

int gram_state_feed(gram_state *s, const void *bytes, size_t n) {
    if (!s || (!bytes && n)) return KP_EINVAL;
    const uint8_t *b = bytes;
    gset *a = &s->tmp;
    set_copy(a, &s->cur);
    gset *nb = &s->tmp2;
    for (size_t i = 0; i < n; i++) {
        set_step(s->g, a, b[i], nb);
        if (!nb->n) return KP_EINVAL;
        set_copy(a, nb);
    }
    set_copy(&s->cur, a);
    return 0;
}

bool gram_state_accepting(const gram_state *s) { return s && set_accepting(s->g, &s->cur); }

bool gram_state_complete(const gram_state *s) {
    if (!s || !s->cur.n) return false;
    for (int i = 0; i < s->cur.n; i++)
        if (s->cur.t[i].depth) return false;
    return true;
}

int gram_state_accept_token(gram_state *s, int32_t id) {
    if (!s || !s->gv || id < 0 || id >= s->gv->n_vocab) return KP_EINVAL;
    for (int i = 0; i < s->gv->n_eog; i++)
        if (s->gv->eog[i] == id) return gram_state_accepting(s) ? 0 : KP_EINVAL;
    if (!s->gv->len[id]) return KP_EINVAL;
    return gram_state_feed(s, s->gv->bytes + s->gv->off[id], s->gv->len[id]);
}

static int walk(gram_state *s, const trie *t, uint32_t *mask) {
    int count = 0;
    set_copy(&s->levels[0], &s->cur);
    for (int32_t i = 0; i < t->n_nodes;) {
        int d = t->depth[i];
        gset *dst = &s->levels[d];
        set_step(s->g, &s->levels[d - 1], t->byte[i], dst);
        if (!dst->n) {
            i = t->end[i];
            continue;
        }
        for (int32_t k = 0; k < t->ntok[i]; k++) {
            int32_t id = t->ids[t->tok0[i] + k];
            uint32_t bit = 1u << (id % 32);
            if (!(mask[id / 32] & bit)) {
                mask[id / 32] |= bit;
                count++;
            }
        }
        i++;
    }
    return count;
}

int gram_mask(gram_state *s, uint32_t *mask) {
    if (!s || !s->gv || !mask) return KP_EINVAL;
    const gram_vocab *gv = s->gv;
    if (!s->levels && !(s->levels = malloc(sizeof(gset) * ((size_t)gv->max_len + 1)))) return KP_ENOMEM;
    int count = 0;
    int room = -1; /* code points a plain token may have here; -1: not in a plain string */
    if (s->cur.n == 1 && s->cur.t[0].depth) {
        const gthread *t = &s->cur.t[0];
        const gframe *f = &t->f[t->depth - 1];
        const gnode *n = &s->g->nodes[f->node];
        if (f->kind == F_STR && f->phase == S_NORM)
            room = n->max_len < 0 ? PLAIN_MAX : KP_MIN(PLAIN_MAX, n->max_len - (int32_t)f->a);
    }
    if (room >= 0) {
        const uint32_t *pm = gv->plain_le[room];
        memcpy(mask, pm, sizeof(uint32_t) * (size_t)gv->words);
        for (int w = 0; w < gv->words; w++) count += __builtin_popcount(pm[w]);
        count += walk(s, &gv->nonplain, mask);
    } else {
        memset(mask, 0, sizeof(uint32_t) * (size_t)gv->words);
        count = walk(s, &gv->full, mask);
    }
    if (set_accepting(s->g, &s->cur))
        for (int i = 0; i < gv->n_eog; i++) {
            int32_t id = gv->eog[i];
            if (!(mask[id / 32] & (1u << (id % 32)))) count++;
            mask[id / 32] |= 1u << (id % 32);
        }
    return count;
}

void gram_apply_mask(const uint32_t *mask, float *logits, int32_t n_vocab) {
    for (int32_t w = 0; w * 32 < n_vocab; w++) {
        uint32_t m = mask[w];
        if (m == 0xFFFFFFFFu) continue;
        int32_t lim = n_vocab - w * 32 < 32 ? n_vocab - w * 32 : 32;
        if (m == 0) {
            for (int32_t b = 0; b < lim; b++) logits[w * 32 + b] = -INFINITY;
            continue;
        }
        for (int32_t b = 0; b < lim; b++)
            if (!(m & (1u << b))) logits[w * 32 + b] = -INFINITY;
    }
}
