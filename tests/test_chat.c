/*
 * test_chat.c — chat templates: golden renderings written by hand from the
 * format definitions (llama.cpp's llm_chat_apply_template for chatml,
 * llama2-sys-strip and llama3; our documented plain fallback), detection on
 * excerpts of real Jinja templates, role validation and name <-> enum.
 */
#include "tests/testutil.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/chat.h"

/* system + user + assistant + user. The last user turn carries surrounding
 * whitespace: chatml and plain keep it, llama2 and llama3 trim it. */
static const chat_msg conv[] = {
    {"system", "You are a helpful assistant."},
    {"user", "Hello"},
    {"assistant", "Hi there!"},
    {"user", "  How are you?\n"},
};

static char *render(enum chat_template t, const chat_msg *m, size_t n, bool gen,
                    const char *bos, const char *eos) {
    char *out = (char *)0x1;
    kp_err err = {0};
    int rc = chat_apply(t, m, n, gen, bos, eos, &out, &err);
    if (rc != 0) fail_msg("chat_apply(%s) failed: %s", chat_template_name(t), err.msg);
    assert_non_null(out);
    return out;
}

static void expect_render(enum chat_template t, const chat_msg *m, size_t n, bool gen,
                          const char *eos, const char *want) {
    char *got = render(t, m, n, gen, "<s>", eos);
    if (strcmp(got, want) != 0)
        fail_msg("%s (gen=%d):\n got: [%s]\nwant: [%s]", chat_template_name(t), (int)gen, got,
                 want);
    free(got);
}

static void test_chatml(void **state) {
    (void)state;
    const char *body = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                       "<|im_start|>user\nHello<|im_end|>\n"
                       "<|im_start|>assistant\nHi there!<|im_end|>\n"
                       "<|im_start|>user\n  How are you?\n<|im_end|>\n";
    expect_render(CHAT_CHATML, conv, 4, false, "</s>", body);
    char want[1024];
    snprintf(want, sizeof want, "%s<|im_start|>assistant\n", body);
    expect_render(CHAT_CHATML, conv, 4, true, "</s>", want);
}

static void test_llama2(void **state) {
    (void)state;
    const char *want = "[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\n"
                       "Hello [/INST]Hi there!</s>[INST] How are you? [/INST]";
    /* llama2 ignores add_generation_prompt (it already ends in [/INST]) */
    expect_render(CHAT_LLAMA2, conv, 4, true, "</s>", want);
    expect_render(CHAT_LLAMA2, conv, 4, false, "</s>", want);
    /* empty EOS text falls back to llama.cpp's literal "</s>" */
    expect_render(CHAT_LLAMA2, conv, 4, true, "", want);
    expect_render(CHAT_LLAMA2, conv, 4, true, NULL, want);
    /* a vocabulary with another EOS text uses it */
    expect_render(CHAT_LLAMA2, conv, 4, true, "<|eos|>",
                  "[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\n"
                  "Hello [/INST]Hi there!<|eos|>[INST] How are you? [/INST]");
    /* no system message; a conversation ending with an assistant turn */
    expect_render(CHAT_LLAMA2, conv + 1, 2, true, "</s>", "[INST] Hello [/INST]Hi there!</s>");
    /* system content is trimmed too */
    const chat_msg sys_ws[] = {{"system", "\n be brief \t"}, {"user", "hi"}};
    expect_render(CHAT_LLAMA2, sys_ws, 2, true, "</s>",
                  "[INST] <<SYS>>\nbe brief\n<</SYS>>\n\nhi [/INST]");
}

static void test_llama3(void **state) {
    (void)state;
    const char *body = "<|start_header_id|>system<|end_header_id|>\n\n"
                       "You are a helpful assistant.<|eot_id|>"
                       "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
                       "<|start_header_id|>assistant<|end_header_id|>\n\nHi there!<|eot_id|>"
                       "<|start_header_id|>user<|end_header_id|>\n\nHow are you?<|eot_id|>";
    expect_render(CHAT_LLAMA3, conv, 4, false, "</s>", body);
    char want[1024];
    snprintf(want, sizeof want, "%s<|start_header_id|>assistant<|end_header_id|>\n\n", body);
    expect_render(CHAT_LLAMA3, conv, 4, true, "</s>", want);
}

static void test_plain(void **state) {
    (void)state;
    /* the assistant's reply continues the text before it, without a separator */
    expect_render(CHAT_PLAIN, conv, 4, true, "</s>",
                  "You are a helpful assistant.\nHelloHi there!\n  How are you?\n");
    expect_render(CHAT_PLAIN, conv, 4, false, "</s>",
                  "You are a helpful assistant.\nHelloHi there!\n  How are you?\n");
    /* the key property: one user message is exactly its text */
    const chat_msg story[] = {{"user", "Once upon a time, there was a little"}};
    expect_render(CHAT_PLAIN, story, 1, true, "</s>", "Once upon a time, there was a little");
    expect_render(CHAT_PLAIN, story, 1, false, "</s>", "Once upon a time, there was a little");
}

static void test_empty_conversation(void **state) {
    (void)state;
    expect_render(CHAT_PLAIN, NULL, 0, true, "</s>", "");
    expect_render(CHAT_CHATML, NULL, 0, false, "</s>", "");
    expect_render(CHAT_CHATML, NULL, 0, true, "</s>", "<|im_start|>assistant\n");
    expect_render(CHAT_LLAMA3, NULL, 0, true, "</s>",
                  "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

/* A session's next turn starts with what the last one left in it: the
 * rendered prompt of turn 1 plus the reply as written, for every template
 * (trimming templates need a reply without surrounding whitespace; plain and
 * chatml keep any). */
static void test_next_turn_extends(void **state) {
    (void)state;
    const enum chat_template all[] = {CHAT_PLAIN, CHAT_CHATML, CHAT_LLAMA2, CHAT_LLAMA3};
    const char *replies[] = {"Hi there!", " Hi there!\n"};
    for (size_t i = 0; i < KP_ARRAY_LEN(all); i++)
        for (size_t k = 0; k < 2; k++) {
            bool trims = all[i] == CHAT_LLAMA2 || all[i] == CHAT_LLAMA3;
            if (k == 1 && trims) continue;
            const chat_msg t1[] = {{"system", "Be brief."}, {"user", "Hello"}};
            const chat_msg t2[] = {{"system", "Be brief."}, {"user", "Hello"}, {"assistant", replies[k]},
                                   {"user", "And then?"}};
            char *a = render(all[i], t1, 2, true, "", "</s>"), *b = render(all[i], t2, 4, true, "", "</s>");
            size_t la = strlen(a), lr = strlen(replies[k]);
            if (strncmp(b, a, la) != 0 || strncmp(b + la, replies[k], lr) != 0)
                fail_msg("%s: turn 2 does not start with turn 1 + its reply:\n%s\n---\n%s", chat_template_name(all[i]),
                         a, b);
            free(a), free(b);
        }
}

static void test_bad_input(void **state) {
    (void)state;
    const enum chat_template all[] = {CHAT_PLAIN, CHAT_CHATML, CHAT_LLAMA2, CHAT_LLAMA3};
    const chat_msg bad_role[] = {{"user", "hi"}, {"tool", "42"}};
    const chat_msg no_role[] = {{NULL, "hi"}};
    const chat_msg no_content[] = {{"user", NULL}};
    const chat_msg upper[] = {{"User", "hi"}};
    for (size_t i = 0; i < KP_ARRAY_LEN(all); i++) {
        char *out = (char *)0x1;
        kp_err err = {0};
        assert_int_equal(chat_apply(all[i], bad_role, 2, true, "", "", &out, &err), KP_EINVAL);
        assert_null(out);
        assert_non_null(strstr(err.msg, "tool"));
        assert_non_null(strstr(err.msg, "message 1"));
        assert_int_equal(chat_apply(all[i], no_role, 1, true, "", "", &out, &err), KP_EINVAL);
        assert_int_equal(chat_apply(all[i], no_content, 1, true, "", "", &out, &err),
                         KP_EINVAL);
        assert_int_equal(chat_apply(all[i], upper, 1, true, "", "", &out, NULL), KP_EINVAL);
        assert_null(out);
    }
    char *out = NULL;
    assert_int_equal(chat_apply((enum chat_template)99, conv, 1, true, "", "", &out, NULL),
                     KP_EINVAL);
    assert_null(out);
}

/* Excerpts of the real templates as they appear in tokenizer.chat_template. */
static const char llama2_tmpl[] =
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}";

static const char llama3_tmpl[] =
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}";

static const char qwen2_tmpl[] =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

static const char chatml_tmpl[] =
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

static const char gemma_tmpl[] =
    "{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + role + '\\n' + "
    "message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}";

static void test_detect(void **state) {
    (void)state;
    assert_int_equal(chat_template_detect(llama2_tmpl), CHAT_LLAMA2);
    assert_int_equal(chat_template_detect(llama3_tmpl), CHAT_LLAMA3);
    assert_int_equal(chat_template_detect(qwen2_tmpl), CHAT_CHATML);
    assert_int_equal(chat_template_detect(chatml_tmpl), CHAT_CHATML);
    assert_int_equal(chat_template_detect(gemma_tmpl), CHAT_PLAIN);
    assert_int_equal(chat_template_detect(NULL), CHAT_PLAIN);
    assert_int_equal(chat_template_detect(""), CHAT_PLAIN);
    /* bare names select directly */
    assert_int_equal(chat_template_detect("llama3"), CHAT_LLAMA3);
    assert_int_equal(chat_template_detect("chatml"), CHAT_CHATML);
}

static void test_names(void **state) {
    (void)state;
    const enum chat_template all[] = {CHAT_PLAIN, CHAT_CHATML, CHAT_LLAMA2, CHAT_LLAMA3};
    const char *names[] = {"plain", "chatml", "llama2", "llama3"};
    for (size_t i = 0; i < KP_ARRAY_LEN(all); i++) {
        assert_string_equal(chat_template_name(all[i]), names[i]);
        assert_int_equal(chat_template_from_name(names[i]), (int)all[i]);
    }
    assert_int_equal(chat_template_from_name("vicuna"), -1);
    assert_int_equal(chat_template_from_name("ChatML"), -1);
    assert_int_equal(chat_template_from_name(""), -1);
    assert_int_equal(chat_template_from_name(NULL), -1);
    assert_string_equal(chat_template_name((enum chat_template)42), "unknown");
}

int main(int argc, char **argv) {
    tu_apply_filter_args(argc, argv);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_chatml),          cmocka_unit_test(test_llama2),
        cmocka_unit_test(test_llama3),          cmocka_unit_test(test_plain), cmocka_unit_test(test_next_turn_extends),
        cmocka_unit_test(test_empty_conversation), cmocka_unit_test(test_bad_input),
        cmocka_unit_test(test_detect),          cmocka_unit_test(test_names),
    };
    return cmocka_run_group_tests_name("chat", tests, NULL, NULL);
}
