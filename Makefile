# The README's contract: `sudo make demo` and `sudo make test` on a fresh
# Debian 12 machine. Both set up first (deploy/install.sh is idempotent).
VENV   := .venv
PYTHON := $(VENV)/bin/python

.PHONY: setup setup-bench demo test bench lab-down clean

setup:
	./deploy/install.sh

setup-bench:
	./deploy/install.sh --bench

demo: setup
	$(PYTHON) -m lb.demo

test: setup
	$(PYTHON) -m pytest

bench: setup-bench
	@for script in tests/bench/*.py; do \
		echo "== $$script"; \
		$(PYTHON) $$script || exit $$?; \
	done

lab-down:
	$(VENV)/bin/lb lab down

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
