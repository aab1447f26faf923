"""The results edge: the DuckDB store of every per-example log-likelihood, model and task keys, the lm-eval
arithmetic that turns log-likelihoods into scores and ensembles, and lm-evaluation-harness result files."""
