"""Evaluation tasks: definitions (:mod:`.specs`), the registry of built-ins and users' files (:mod:`.registry`),
data file readers (:mod:`.readers`) and dataset row mapping (:mod:`.rows`)."""
