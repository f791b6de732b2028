# Two commands on a fresh machine:  make quickstart  (quantize the bundled model, print ppl table)
#                                   make test        (the test suite; CI runs exactly this)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel; an unpinned torch pulls a multi-GB CUDA build. On a GPU machine: make TORCH=torch ...
TORCH ?= torch==2.13.0
OUT ?= out/fixture-awq-w4g128
AUTOAWQ := $(VENV)/autoawq

export HF_HUB_OFFLINE = 1
export HF_DATASETS_OFFLINE = 1
export PREFECT_SERVER_ANALYTICS_ENABLED = false
export PYTHONUNBUFFERED = 1

.PHONY: quickstart test venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	echo "$(TORCH)" > $(VENV)/constraints.txt
	$(PY) -m pip install -q -e ".[test]" -c $(VENV)/constraints.txt
	# AutoAWQ's own GEMM decoder checks our packing in the tests (pure Python; its deps are not needed)
	$(PY) -m pip install -q --no-deps --no-build-isolation autoawq==0.2.9
	touch $@

venv: $(VENV)/.installed

# AutoAWQ 0.2.9 + transformers 4.51.3 beside the venv for tests/test_autoawq.py (~7 s); a failed install is recorded
# in $(AUTOAWQ).failed and that test skips, quoting it
$(AUTOAWQ)/.installed: $(VENV)/.installed tests/autoawq_env.sh
	sh tests/autoawq_env.sh $(PY) $(AUTOAWQ)

quickstart: venv
	$(VENV)/bin/awqflow quantize --model fixture/model --out $(OUT) \
		--calib fixture/data/calib.txt --eval-text fixture/data/eval.txt

# tests/test_ui.py drives Debian's Chromium (CI runs as root on Debian)
test: venv $(AUTOAWQ)/.installed
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -p no:cacheprovider
