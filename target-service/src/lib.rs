//! Target service: verifies token trees of many sessions in batched forward passes.
