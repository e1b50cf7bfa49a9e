# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch is an optional extra; on this project's machines 2.13.0 (CPU) is the one installed.
TORCH_PIN ?= torch==2.13.0

.PHONY: test demo bench stress stress-hosts lint clean install

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip setuptools wheel

$(STAMP): $(VPY) pyproject.toml setup.py $(wildcard native/*.c native/*.h)
	$(VPY) -m pip install -q numpy
	$(VPY) -m pip install -q "$(TORCH_PIN)"
	$(VPY) -m pip install -q -e ".[test,dev,torch,metrics,plot]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest -q -p no:cacheprovider tests

demo: $(STAMP)
	$(VENV)/bin/pccl demo

bench: $(STAMP)
	$(VENV)/bin/pccl bench kernels
	$(VENV)/bin/pccl bench allreduce --world 2 --compare gloo --rounds 3

# churn twice, 3 minutes each, every kind of fault that needs no root: failed calls sent
# back to update_topology, then retried as a trainer does (small calls, another schedule).
# Each prints its schedule (the same --seed draws it again) and a report; non-zero on a violation.
stress: $(STAMP)
	$(VPY) stress/churn.py --minutes 3 --seed 1 --png churn-1.png --json churn-1.json
	$(VPY) stress/churn.py --minutes 3 --seed 2 --retry --size 500 --png churn-2.png --json churn-2.json

# the same with every peer in its own network namespace (needs root), link cuts included
stress-hosts: $(STAMP)
	$(VPY) stress/churn.py --minutes 3 --hosts --png churn-hosts.png --json churn-hosts.json

lint: $(STAMP)
	$(VENV)/bin/ruff check pccl_py tests stress examples

clean:
	rm -rf build dist *.egg-info churn-*.png churn-*.json pccl-demo.png pccl_py/kernels/*.so .pytest_cache .ruff_cache .hypothesis
	rm -rf $(VENV)
