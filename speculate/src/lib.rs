//! Speculative decoding logic: token trees, dynamic expansion, lossless verification, budget policy.
