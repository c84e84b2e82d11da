"""Which input tokens drive a prediction: token attribution methods, and their comparison by
causal faithfulness on tasks with a known answer."""
