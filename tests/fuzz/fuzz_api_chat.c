/*
 * fuzz_api_chat.c — libFuzzer target for request bodies of
 * api_parse_chat() (POST /v1/chat/completions), server/api.c: the depth scan, jansson and every field
 * reader; the checks are in fuzz_api.h. Input: the body as sent.
 *
 * Why: this is the first code a network client's bytes reach. Use the
 * dictionary tests/fuzz/api.dict (deploy/fuzz.sh passes it).
 */
#include "tests/fuzz/fuzz_api.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) { return fz_api_one(data, size, API_CHAT); }
