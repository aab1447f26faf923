"""Workflows: what a command does, start to end, combining the engines (merging, evaluation, stability) with the
Hub and the results store. The only layer that does so; the CLI is a thin shell over it."""
