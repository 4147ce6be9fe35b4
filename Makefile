# One command to set up and serve, one to set up and test. Both create .venv on first use.
# `make serve` installs what serving needs and nothing more; `make test` (and `make docs`) add the `test`
# extra (pytest, the SDKs the tests drive, linters, Playwright, MkDocs). Each install has its stamp file.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SERVE_STAMP := $(VENV)/.installed-serve
TEST_STAMP  := $(VENV)/.installed-test
ARGS   ?=

.PHONY: setup serve test test-fast lint docs bench clean

# On a GPU machine (docs/models.md, "On GPUs"), one of:
#   make setup TORCH_INDEX_URL=<PyTorch's CUDA wheel index for your CUDA, e.g. its cu128 one>
#       installs torch 2.13.0 built for that CUDA first; constraints.txt's torch==2.13.0 then keeps it;
#   make setup SYSTEM_TORCH=1
#       a venv that sees the system's packages, keeping the CUDA torch (2.11 or newer) already installed.
TORCH_INDEX_URL ?=
SYSTEM_TORCH    ?=
# --no-compile: pip byte-compiles every module it installs (11,500 files, 40 s of CPU on this machine, a third
# of the first `make serve`); serving imports about 500 of them, which Python compiles on first import instead.
PIP := $(BIN)/pip install --quiet --disable-pip-version-check --no-compile
# constraints.txt pins every package; torch==2.13.0 is the CPU wheel here, so no CUDA download. With
# SYSTEM_TORCH the system's torch stays, so its pin is left out.
CONSTRAINTS := $(if $(SYSTEM_TORCH),$(VENV)/constraints-system-torch.txt,constraints.txt)

$(SERVE_STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(if $(SYSTEM_TORCH),--system-site-packages) $(VENV)
ifneq ($(TORCH_INDEX_URL),)
	$(PIP) torch==2.13.0 --index-url $(TORCH_INDEX_URL)
endif
ifneq ($(SYSTEM_TORCH),)
	grep -v '^torch==' constraints.txt > $(CONSTRAINTS)
endif
	$(PIP) -c $(CONSTRAINTS) -e .
	touch $(SERVE_STAMP)

# The suite starts about 150 processes that import torch and transformers. Where PYTHONDONTWRITEBYTECODE is set
# (CI's environment sets it) nothing compiled on first import is kept, and each of them would compile those
# modules again (11 s of CPU each on two cores): the test set-up compiles the venv and the project once instead.
# It exits 1 on the few files packages ship for newer Pythons (torch's py312_intrinsics.py), never imported.
$(TEST_STAMP): $(SERVE_STAMP)
	$(PIP) -c $(CONSTRAINTS) -e ".[test]"
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib llamascope tests bench > /dev/null || true
	touch $(TEST_STAMP)

setup: $(SERVE_STAMP)

serve: $(SERVE_STAMP)
	$(BIN)/llamascope serve $(ARGS)

# lint-imports checks the layering contracts in pyproject.toml ([tool.importlinter]; docs/architecture.md).
lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy llamascope
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest

# The inner loop, under 2 minutes on two cores: no test that needs a llamascope server process or a service,
# none marked slow (the markers in pyproject.toml). `make test` runs everything.
FAST := not server and not postgres and not redis and not nginx and not chromium and not prometheus and not slow
test-fast: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -m "$(FAST)" $(ARGS)

# The documentation site (mkdocs.yml, docs/) into ./site; --strict: a broken link or a missing page fails.
docs: $(TEST_STAMP)
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache .mypy_cache site
