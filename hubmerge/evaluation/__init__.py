"""The evaluation engine: tasks (definitions, registry, readers, the built-in YAML), lm-eval-exact scoring, and
the runner that scores only what the results store lacks (locally or over Ray)."""
