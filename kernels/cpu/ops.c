/* ops.c: not written yet */
typedef int kp_placeholder_ops;
