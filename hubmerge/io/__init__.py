"""The bottom edge of hubmerge: checkpoint readers, the shard writer, provenance, atomic writes, sizes, config
files, progress display and process settings. Nothing here knows about recipes, the Hub or the results store."""
