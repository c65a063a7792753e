"""The evidence behind fimlora's claims, one file per job (speed is bench.py's):

    python -m study.grid              # make results: the SST-2 grid, one train.py run per cell
    python -m study.peers peft-eva -- --model minilm --task sst2 --data-dir D --out O
    python -m study.planted           # uniform vs searched oracle vs every score, planted task
    python -m study.report            # results/README.md and README.md's two generated blocks

grid.py runs cells into results/cells/<task>/<method>-s<seed>/; peers.py runs one cell on
transformers + PEFT (or with an alternative allocation score) through train.run's adapt hook;
report.py reads only the cells and results/*.json and writes every table.
"""
