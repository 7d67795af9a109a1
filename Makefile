# Two commands for a newcomer: `make run` (site + workers) and `make test`.
PY      := .venv/bin/python
STAMP   := .venv/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run test bench lint install soak lock

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	rm -f .venv/.installed-*
	touch $(STAMP)

install: $(STAMP)

run: install
	$(PY) -m picsite.devserver

# ruff, then the import contracts of pyproject.toml's [tool.importlinter] (docs/architecture.md).
lint: install
	.venv/bin/ruff check .
	.venv/bin/lint-imports --no-cache

test: install lint
	$(PY) -m pytest

bench: install
	$(PY) bench/run_all.py

soak: install
	$(PY) bench/soak_crash.py

# Re-pin after editing pyproject.toml: the dev lock (make install, CI) and the runtime-only
# lock the Docker image installs, resolved alike (tests/test_dockerfile.py checks they agree).
lock: install
	$(PY) -m pip install -q uv==0.13.9
	.venv/bin/uv pip compile pyproject.toml --extra dev -o requirements.lock --python-version 3.11
	.venv/bin/uv pip compile pyproject.toml -o requirements.prod.lock --python-version 3.11
