//! Orchestrator: the public Spec-LLaVA gRPC API, routing sessions to draft and target replicas.
