"""Data for fimlora: `data.glue` (GLUE reader, metrics, batching) and `data.planted` (the
embedded `planted` task: a teacher with known low-rank updates, no files needed)."""
