"""The evidence behind fimlora's claims, one file per job (speed is bench.py's): grid.py (make
results), peers.py (PEFT cells), planted.py (the planted study), report.py (results/README.md),
scores.py (the alternative allocation scores)."""
