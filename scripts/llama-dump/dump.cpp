// Runs llama.cpp on one prompt (token ids) and writes every f32 tensor of its graph, for the
// prefill (step 0) and each greedy decode step after it, to OUT_DIR/s<step>_<name>_<op>.bin.
// Usage: dump MODEL OUT_DIR N_STEPS ID [ID ...]
#include "ggml-backend.h"
#include "ggml.h"
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

static int step = 0;
static std::string out_dir;

static bool on_tensor(struct ggml_tensor * t, bool ask, void *) {
    if (ask || t->type != GGML_TYPE_F32) {
        return true;
    }
    std::vector<char> bytes(ggml_nbytes(t));
    ggml_backend_tensor_get(t, bytes.data(), 0, bytes.size());
    std::string name = t->name;
    for (auto & c : name) {
        if (c == '/' || c == ' ' || c == '(' || c == ')') {
            c = '_';
        }
    }
    std::string path = out_dir + "/s" + std::to_string(step) + "_" + name + "_" + ggml_op_desc(t) + ".bin";
    FILE * f = fopen(path.c_str(), "wb");
    if (!f) {
        fprintf(stderr, "cannot write %s\n", path.c_str());
        exit(1);
    }
    fwrite(bytes.data(), 1, bytes.size(), f);
    fclose(f);
    return true;
}

int main(int argc, char ** argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s MODEL OUT_DIR N_STEPS ID [ID ...]\n", argv[0]);
        return 2;
    }
    out_dir = argv[2];
    const int n_steps = atoi(argv[3]);
    std::vector<llama_token> ids;
    for (int i = 4; i < argc; i++) {
        ids.push_back(atoi(argv[i]));
    }
    llama_backend_init();
    llama_model * model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (!model) {
        return 1;
    }
    auto params = llama_context_default_params();
    params.n_ctx = 4096;
    params.n_threads = 2;
    params.n_threads_batch = 2;
    params.cb_eval = on_tensor;
    llama_context * ctx = llama_init_from_model(model, params);
    if (llama_decode(ctx, llama_batch_get_one(ids.data(), ids.size()))) {
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    for (step = 1; step <= n_steps; step++) {
        const float * logits = llama_get_logits_ith(ctx, -1);
        llama_token best = 0;
        for (int i = 1; i < n_vocab; i++) {
            if (logits[i] > logits[best]) {
                best = i;
            }
        }
        printf("%d\n", best);
        if (llama_decode(ctx, llama_batch_get_one(&best, 1))) {
            return 1;
        }
    }
    return 0;
}
