/*
 * chat.c — built-in chat templates: detect one from the GGUF's Jinja text by
 * tell-tale substrings, and render messages into a prompt (contract in
 * chat.h).
 *
 * Why no Jinja: like llama.cpp's llm_chat_apply_template, we recognise the
 * few template families our models use and render them with hand-written
 * code, byte for byte as llama.cpp does:
 *
 *   chatml  "<|im_start|>ROLE\nCONTENT<|im_end|>\n" per message;
 *           generation prompt "<|im_start|>assistant\n". Content verbatim.
 *   llama2  llama.cpp's LLM_CHAT_TEMPLATE_LLAMA_2_SYS_STRIP, the variant it
 *           picks for Meta's Llama-2-chat template (that text contains
 *           "<<SYS>>", "bos_token + '[INST]" and "content.strip()", and the
 *           strip check wins):
 *             "[INST] " once at the start; then per message, content trimmed:
 *             system    -> "<<SYS>>\nCONTENT\n<</SYS>>\n\n"
 *             user      -> "CONTENT [/INST]"
 *             assistant -> "CONTENT" EOS, and the next message opens a new
 *                          "[INST] " (no BOS text inside the history in this
 *                          variant; the tokenizer adds the leading BOS).
 *           EOS is `eos_text` when given, else "</s>" (llama.cpp writes the
 *           literal "</s>", which is Llama-2's EOS text). bos_text is unused.
 *           add_generation_prompt changes nothing: the prompt already ends in
 *           " [/INST]" after a user turn, as in llama.cpp.
 *   llama3  "<|start_header_id|>ROLE<|end_header_id|>\n\nCONTENT<|eot_id|>"
 *           per message, content trimmed; no BOS text (the tokenizer adds
 *           it); generation prompt "<|start_header_id|>assistant<|end_header_id|>\n\n".
 *   plain   for models with no template (stories260K): the messages'
 *           contents verbatim, joined by "\n", except that an assistant
 *           message follows the one before it directly (a reply is the
 *           continuation of that text, as the model wrote it, so a session's
 *           next turn starts with exactly the tokens it holds); no role
 *           markers and no generation prompt. A lone user message renders as
 *           exactly its text, so a story model simply continues the story.
 *
 * "Trimmed" is llama.cpp's trim(): leading and trailing ASCII whitespace
 * (space, \t, \n, \v, \f, \r) removed.
 */
#include "engine/chat.h"

#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------- names --- */

static const char *const chat_names[] = {
    [CHAT_PLAIN] = "plain",
    [CHAT_CHATML] = "chatml",
    [CHAT_LLAMA2] = "llama2",
    [CHAT_LLAMA3] = "llama3",
};

const char *chat_template_name(enum chat_template t) {
    if ((unsigned)t >= KP_ARRAY_LEN(chat_names)) return "unknown";
    return chat_names[t];
}

int chat_template_from_name(const char *name) {
    if (!name) return -1;
    for (size_t i = 0; i < KP_ARRAY_LEN(chat_names); i++)
        if (strcmp(name, chat_names[i]) == 0) return (int)i;
    return -1;
}

enum chat_template chat_template_detect(const char *tmpl_text) {
    if (!tmpl_text) return CHAT_PLAIN;
    /* A bare template name (e.g. from --chat-template) selects it directly,
     * as llama.cpp's llm_chat_detect_template does. */
    int named = chat_template_from_name(tmpl_text);
    if (named >= 0) return (enum chat_template)named;
    /* Same order as llama.cpp: ChatML (Qwen2, OpenHermes...) first. */
    if (strstr(tmpl_text, "<|im_start|>")) return CHAT_CHATML;
    if (strstr(tmpl_text, "[INST]")) return CHAT_LLAMA2;
    if (strstr(tmpl_text, "<|start_header_id|>")) return CHAT_LLAMA3;
    return CHAT_PLAIN;
}

/* ------------------------------------------------------ string builder --- */

typedef struct chat_buf {
    char *s;
    size_t len, cap;
    int oom;
} chat_buf;

static void cb_putn(chat_buf *b, const char *s, size_t n) {
    if (b->oom) return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (b->len + n + 1 > cap) cap *= 2;
        char *t = realloc(b->s, cap);
        if (!t) {
            b->oom = 1;
            return;
        }
        b->s = t;
        b->cap = cap;
    }
    memcpy(b->s + b->len, s, n);
    b->len += n;
    b->s[b->len] = 0;
}

static void cb_put(chat_buf *b, const char *s) { cb_putn(b, s, strlen(s)); }

static int is_trim_space(char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r';
}

/* Append s without leading/trailing whitespace (llama.cpp's trim()). */
static void cb_put_trimmed(chat_buf *b, const char *s) {
    size_t start = 0, end = strlen(s);
    while (start < end && is_trim_space(s[start])) start++;
    while (end > start && is_trim_space(s[end - 1])) end--;
    cb_putn(b, s + start, end - start);
}

/* ------------------------------------------------------------ render --- */

enum { ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT };

static int role_of(const char *role) {
    if (strcmp(role, "system") == 0) return ROLE_SYSTEM;
    if (strcmp(role, "user") == 0) return ROLE_USER;
    if (strcmp(role, "assistant") == 0) return ROLE_ASSISTANT;
    return -1;
}

static void render_chatml(chat_buf *b, const chat_msg *msgs, size_t n, bool gen) {
    for (size_t i = 0; i < n; i++) {
        cb_put(b, "<|im_start|>");
        cb_put(b, msgs[i].role);
        cb_put(b, "\n");
        cb_put(b, msgs[i].content);
        cb_put(b, "<|im_end|>\n");
    }
    if (gen) cb_put(b, "<|im_start|>assistant\n");
}

static void render_llama2(chat_buf *b, const chat_msg *msgs, size_t n, const char *eos) {
    bool inside_turn = true; /* the first "[INST] " is written up front */
    cb_put(b, "[INST] ");
    for (size_t i = 0; i < n; i++) {
        if (!inside_turn) {
            inside_turn = true;
            cb_put(b, "[INST] ");
        }
        switch (role_of(msgs[i].role)) {
        case ROLE_SYSTEM:
            cb_put(b, "<<SYS>>\n");
            cb_put_trimmed(b, msgs[i].content);
            cb_put(b, "\n<</SYS>>\n\n");
            break;
        case ROLE_USER:
            cb_put_trimmed(b, msgs[i].content);
            cb_put(b, " [/INST]");
            break;
        default: /* assistant */
            cb_put_trimmed(b, msgs[i].content);
            cb_put(b, eos);
            inside_turn = false;
            break;
        }
    }
}

static void render_llama3(chat_buf *b, const chat_msg *msgs, size_t n, bool gen) {
    for (size_t i = 0; i < n; i++) {
        cb_put(b, "<|start_header_id|>");
        cb_put(b, msgs[i].role);
        cb_put(b, "<|end_header_id|>\n\n");
        cb_put_trimmed(b, msgs[i].content);
        cb_put(b, "<|eot_id|>");
    }
    if (gen) cb_put(b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

static void render_plain(chat_buf *b, const chat_msg *msgs, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (i > 0 && role_of(msgs[i].role) != ROLE_ASSISTANT) cb_put(b, "\n");
        cb_put(b, msgs[i].content);
    }
}

int chat_apply(enum chat_template t, const chat_msg *msgs, size_t n,
               bool add_generation_prompt, const char *bos_text, const char *eos_text,
               char **out, kp_err *err) {
    (void)bos_text; /* none of our templates writes BOS text; see above */
    if (!out) return kp_errf(err, KP_EINVAL, "chat: no output pointer");
    *out = NULL;
    if ((unsigned)t >= KP_ARRAY_LEN(chat_names))
        return kp_errf(err, KP_EINVAL, "chat: unknown template %d", (int)t);
    if (n > 0 && !msgs) return kp_errf(err, KP_EINVAL, "chat: %zu messages but no array", n);
    for (size_t i = 0; i < n; i++) {
        if (!msgs[i].role)
            return kp_errf(err, KP_EINVAL, "chat: message %zu has no role", i);
        if (role_of(msgs[i].role) < 0)
            return kp_errf(err, KP_EINVAL,
                           "chat: message %zu has role '%.64s'; expected 'system', 'user' or "
                           "'assistant'",
                           i, msgs[i].role);
        if (!msgs[i].content)
            return kp_errf(err, KP_EINVAL, "chat: message %zu (%s) has no content", i,
                           msgs[i].role);
    }

    chat_buf b = {0};
    cb_put(&b, ""); /* an empty conversation still yields "" */
    switch (t) {
    case CHAT_CHATML: render_chatml(&b, msgs, n, add_generation_prompt); break;
    case CHAT_LLAMA2:
        render_llama2(&b, msgs, n, eos_text && *eos_text ? eos_text : "</s>");
        break;
    case CHAT_LLAMA3: render_llama3(&b, msgs, n, add_generation_prompt); break;
    case CHAT_PLAIN: render_plain(&b, msgs, n); break;
    }
    if (b.oom) {
        free(b.s);
        return kp_errf(err, KP_ENOMEM, "chat: out of memory rendering %zu messages", n);
    }
    *out = b.s;
    return KP_OK;
}
