"""The merging engine: recipes, merge methods, plans (of one merge or a sweep of windows) and the one streaming
executor that carries them out."""
