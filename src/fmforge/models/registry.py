"""Family defaults and named sizes. A config names an ``arch`` and optionally a ``size``; fields it sets
explicitly win over both (see ``ModelConfig.resolved``)."""

ARCH_DEFAULTS: dict[str, dict] = {
    # GPT-2: learned positions, LayerNorm, GELU MLP, biases everywhere, tied input/output embeddings.
    "gpt2": dict(norm="layernorm", mlp="gelu", pos="learned", bias=True, tie_embeddings=True,
                 rope_theta=10000.0),
    # Llama: rotary positions, RMSNorm, SwiGLU MLP, no biases, separate output head.
    "llama": dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, tie_embeddings=False,
                  rope_theta=10000.0),
}

SIZES: dict[str, dict] = {
    # CPU sizes: tests and the quickstart.
    "nano": dict(n_layer=2, n_head=4, d_model=64),
    "micro": dict(n_layer=4, n_head=4, d_model=128),
    "tiny": dict(n_layer=6, n_head=6, n_kv_head=2, d_model=192),
    # GPT-2 family (Radford et al. 2019).
    "gpt2-124m": dict(n_layer=12, n_head=12, d_model=768, max_seq_len=1024),
    "gpt2-350m": dict(n_layer=24, n_head=16, d_model=1024, max_seq_len=1024),
    "gpt2-774m": dict(n_layer=36, n_head=20, d_model=1280, max_seq_len=1024),
    "gpt2-1.5b": dict(n_layer=48, n_head=25, d_model=1600, max_seq_len=1024),
    # Llama-style shapes (GQA with 8 KV heads at 1B like Llama 3.2).
    "llama-125m": dict(n_layer=12, n_head=12, n_kv_head=4, d_model=768, max_seq_len=2048),
    "llama-350m": dict(n_layer=24, n_head=16, n_kv_head=8, d_model=1024, max_seq_len=2048),
    "llama-1b": dict(n_layer=16, n_head=32, n_kv_head=8, d_model=2048, d_ff=8192, max_seq_len=2048,
                     rope_theta=500000.0),
}
