# Two commands on a fresh machine (only Python, pip and a C++ compiler needed):
#   make demo   set everything up in ./.venv and run the demo on bundled data
#   make test   set everything up in ./.venv and run the whole test suite
SHELL  := /bin/bash
PYTHON ?= python3
VENV   ?= $(CURDIR)/.venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.nmaem-installed
DEMO_DIR ?= $(CURDIR)/demo_output

# Scipion in a plain virtual environment: its folders live in the checkout.
export SCIPION_HOME      ?= $(CURDIR)/.scipion
export SCIPION_USER_DATA ?= $(CURDIR)/.scipion/userdata
export SCIPION_TESTS     ?= $(CURDIR)/.scipion/tests
export SCIPION_TEST_NOSYNC = 1
export SCIPION_LOCAL_CONFIG ?= $(SCIPION_HOME)/config/scipion.conf
# Scipion launches protocols with this interpreter (by default a bare python3 from PATH)
export SCIPION_PYTHON    = $(PY)
# PyKeOps compiles its kernels with g++ on first use: keep them between runs.
export KEOPS_CACHE_FOLDER ?= $(CURDIR)/.keops_cache
export MPLBACKEND = Agg

.PHONY: all install scipion-dirs demo demo-cli gui test bench clean

all: test

$(STAMP): setup.py requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install -e .
	touch $(STAMP)

install: $(STAMP)

scipion-dirs:
	@mkdir -p $(SCIPION_HOME) $(SCIPION_USER_DATA) $(SCIPION_TESTS) $(KEOPS_CACHE_FOLDER)

# Scipion's own test runner (python -m scipion == scipion3); it exits non-zero when a test
# fails or none ran. The last lines name each failed test and repeat the count.
test: $(STAMP) scipion-dirs
	@set -o pipefail; $(PY) -m scipion tests nmaem_plugin 2>&1 | tee $(SCIPION_HOME)/tests.log; \
	rc=$$?; $(PY) -m nmaem_plugin.tests.summary $(SCIPION_HOME)/tests.log; exit $$rc

# the Scipion workflow in a headless project (import, simulate, modes, train, infer, export,
# evaluate); demo-cli runs the same chain as plain nmaem commands and draws the figures
demo: $(STAMP) scipion-dirs
	$(PY) -m nmaem_plugin.demo_scipion

# the Scipion GUI on the demo project (or PROJECT=name), with the interpreter and folders
# above, so that protocols launched from it (and "show model") run
PROJECT ?= nmaem_demo
gui: $(STAMP) scipion-dirs
	SCIPION_DOMAIN=pwem SCIPION_NOTIFY=False $(PY) -m scipion project $(PROJECT)

demo-cli: $(STAMP) scipion-dirs
	$(PY) -m nmaem_plugin.demo -o $(DEMO_DIR)

bench: $(STAMP) scipion-dirs
	$(PY) bench/render.py

clean:
	rm -rf $(VENV) $(CURDIR)/.scipion $(KEOPS_CACHE_FOLDER) $(DEMO_DIR) *.egg-info
