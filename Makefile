# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo test lint data bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks examples

test: venv lint
	$(PY) -m pytest -q

# The main job: 5 optimisers on Fashion-MNIST, 3 epochs each (docs/demo.md). Fetches the data
# first when it is not found (./data, $$SIGNSGD_DATA, /usr/share/datasets/fashion-mnist).
DEMO_OUT ?= runs/demo
demo: venv
	@$(PY) -c "import signsgd.data as d; d.locate('fashion-mnist')" >/dev/null 2>&1 \
		|| $(MAKE) data
	$(VENV)/bin/signsgd compare --out $(DEMO_OUT)

# Fashion-MNIST from Debian's dataset-fashion-mnist package, without root: `apt-get download`
# (with a private package list when the system's is empty) and `dpkg-deb -x` into ./data.
DATA_DIR ?= data
APT_TMP  := $(DATA_DIR)/.apt
data:
	@set -e; mkdir -p $(DATA_DIR)/fashion-mnist $(APT_TMP)/lists/partial $(APT_TMP)/cache/archives/partial; \
	if ls $(DATA_DIR)/fashion-mnist/train-images-idx3-ubyte.gz >/dev/null 2>&1; then \
		echo "Fashion-MNIST already in $(DATA_DIR)/fashion-mnist"; exit 0; fi; \
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
	ls -l fashion-mnist

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
