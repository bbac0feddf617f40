//! LLaVA vision-language models on candle: HF checkpoints, tree-attention forward, per-session KV.
