"""Data for fimlora: tasks (the Task train.py trains on), glue (GLUE reader, batching, metrics),
causal (prompts for decoders), files (--data FILE), planted (the embedded task), metrics."""
