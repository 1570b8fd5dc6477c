/*
 * chat.h — built-in chat templates (no Jinja interpreter).
 *
 * Contract
 *   - chat_template_detect() picks a template by looking for tell-tale
 *     substrings in the GGUF's `tokenizer.chat_template` ("<|im_start|>" ->
 *     chatml, "<|start_header_id|>" -> llama3, "[INST]" -> llama2); NULL or
 *     unknown -> plain.
 *   - chat_apply() renders messages into prompt text (to be tokenised with
 *     parse_special=true); add_generation_prompt appends the assistant header.
 *     The rendering of each template matches what llama.cpp's
 *     llama_chat_apply_template produces for the same messages.
 *   - Roles are "system", "user", "assistant" (others refused with
 *     KP_EINVAL).
 *   - The exact formats are listed in chat.c's header comment. In short:
 *     llama2 is llama.cpp's "llama2-sys-strip" variant (the one it picks for
 *     Meta's Llama-2-chat template); plain is every message's content
 *     verbatim joined by "\n" with no generation prompt, so one user message
 *     renders as just its text (a story model continues it).
 *   - chat_template_detect() also accepts a bare name ("chatml", ...).
 */
#ifndef KP_CHAT_H
#define KP_CHAT_H

#include <stdbool.h>
#include <stddef.h>

#include "kernels/kp.h"

enum chat_template {
    CHAT_PLAIN = 0, /* no template: contents joined by "\n", no role markers */
    CHAT_CHATML,
    CHAT_LLAMA2,
    CHAT_LLAMA3,
};

typedef struct chat_msg {
    const char *role;
    const char *content;
} chat_msg;

enum chat_template chat_template_detect(const char *tmpl_text /* may be NULL */);
/* "chatml", "llama2", "llama3", "plain" <-> enum; -1 if unknown name. */
int chat_template_from_name(const char *name);
const char *chat_template_name(enum chat_template t);

/* Render into a malloc'd NUL-terminated string. bos_text/eos_text are the
 * vocabulary's BOS/EOS token texts (llama2 uses them), may be "". */
int chat_apply(enum chat_template t, const chat_msg *msgs, size_t n,
               bool add_generation_prompt, const char *bos_text, const char *eos_text,
               char **out, kp_err *err);

#endif
