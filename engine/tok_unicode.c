/* tok_unicode.c: not written yet */
typedef int kp_placeholder_tok_unicode;
