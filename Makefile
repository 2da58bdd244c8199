# One command to start VMO, one to test it; CI (.ci/run) calls `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := $(shell cat packages/apt.txt)

.PHONY: up down test check install system-packages qemu-user bench clean

up: install
	$(BIN)/vmo up -d
	$(BIN)/vmo demo

down:
	$(BIN)/vmo down

test: install check
	$(BIN)/pytest -q

check: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: install
	$(BIN)/python bench/apiserver.py
	$(BIN)/python bench/watch_memory.py
	$(BIN)/python bench/vm_start.py
	$(BIN)/python bench/migration.py --quick
	$(BIN)/python bench/snapshots.py
	$(BIN)/python bench/backup.py
	$(BIN)/python bench/runtime.py

install: system-packages qemu-user $(VENV)/.installed

# QEMU drops root's privileges to this account after opening its disks, taps and sockets
qemu-user:
	@id vmo-qemu >/dev/null 2>&1 || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin vmo-qemu; }

system-packages:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing system packages:$$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; \
	fi

$(VENV)/.installed: pyproject.toml requirements.lock
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info
