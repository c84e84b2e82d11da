"""Reading a circuit: what its heads do (roles, attention patterns), what each layer already
predicts (logit and tuned lens), what each component writes to the answer (direct logit
attribution), and where a fact is recalled (causal tracing)."""
