# One command to set up and serve, one to set up and test. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: setup serve test test-fast lint bench clean

# On a GPU machine (README, "On GPUs"), one of:
#   make setup TORCH_INDEX_URL=<PyTorch's CUDA wheel index for your CUDA, e.g. its cu128 one>
#       installs torch 2.13.0 built for that CUDA first; constraints.txt's torch==2.13.0 then keeps it;
#   make setup SYSTEM_TORCH=1
#       a venv that sees the system's packages, keeping the CUDA torch (2.11 or newer) already installed.
TORCH_INDEX_URL ?=
SYSTEM_TORCH    ?=
PIP := $(BIN)/pip install --quiet --disable-pip-version-check

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(if $(SYSTEM_TORCH),--system-site-packages) $(VENV)
ifneq ($(TORCH_INDEX_URL),)
	$(PIP) torch==2.13.0 --index-url $(TORCH_INDEX_URL)
endif
ifneq ($(SYSTEM_TORCH),)
	grep -v '^torch==' constraints.txt > $(VENV)/constraints-system-torch.txt
	$(PIP) -c $(VENV)/constraints-system-torch.txt -e ".[test]"
else
	# constraints.txt pins every package; torch==2.13.0 is the CPU wheel here, so no CUDA download.
	$(PIP) -c constraints.txt -e ".[test]"
endif
	touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	$(BIN)/llamascope serve $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy llamascope

test: lint
	$(BIN)/python -m pytest

# The inner loop, under 2 minutes on two cores: no test that needs a llamascope server process or a service,
# none marked slow (the markers in pyproject.toml). `make test` runs everything.
FAST := not server and not postgres and not redis and not nginx and not chromium and not prometheus and not slow
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "$(FAST)" $(ARGS)

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache .mypy_cache
