"""Data for fimlora: tasks (the Task train.py trains on), glue (GLUE tasks, batching, metrics),
files (the row reader: --data FILE and GLUE), causal (prompts for decoders), planted."""
