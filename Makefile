# The README's contract: `sudo make demo` and `sudo make test` on a fresh
# Debian 12 machine. Both set up first (deploy/install.sh is idempotent).
VENV   := .venv
PYTHON := $(VENV)/bin/python

.PHONY: setup setup-bench setup-kernels setup-vagrant demo test test-kernels vagrant-test bench lab-down clean

setup:
	./deploy/install.sh

setup-bench:
	./deploy/install.sh --bench

setup-kernels:
	./deploy/install.sh --kernels

setup-vagrant:
	./deploy/install.sh --vagrant

demo: setup
	$(PYTHON) -m lb.demo

test: setup
	$(PYTHON) -m pytest

# The XDP program's fixtures on each supported kernel: this host's, and
# Debian 12's stock 6.1 in a QEMU guest (tests/kernels/run.sh). Minutes, not
# part of `make test`.
test-kernels: setup-kernels
	./tests/kernels/run.sh

# The Vagrant lab booted for real (vagrant/README.md): five libvirt VMs, the
# walk-through as assertions, everything destroyed at the end, pass or fail
# (vagrant/test/run.sh). About 25 minutes under TCG, not part of `make test`.
vagrant-test: setup-vagrant
	./vagrant/test/run.sh

bench: setup-bench
	@for script in tests/bench/*.py; do \
		echo "== $$script"; \
		$(PYTHON) $$script || exit $$?; \
	done

lab-down:
	$(VENV)/bin/lb lab down

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
