//! Spec-LLaVA gRPC protocol (specllava.v1): generated client and server code.
