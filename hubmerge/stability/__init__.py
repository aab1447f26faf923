"""The stability engine: instability metrics (pure numpy), reports and series (from the results store), plots,
and the model card's rendering."""
