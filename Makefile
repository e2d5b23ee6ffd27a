# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
# Python 3.11 or newer: python3 if it is one, else the newest python3.1x there is
# (Amazon Linux 2023's python3 is 3.9: dnf install python3.11).
PYTHON ?= $(shell for p in python3 python3.14 python3.13 python3.12 python3.11; do \
	$$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && { echo $$p; break; }; done)
VENV   := .venv
PY     := $(VENV)/bin/python
REQS   := requirements.txt requirements-runtime.txt requirements-web.txt constraints.txt
STAMP  := $(VENV)/.installed-$(shell cat $(REQS) | cksum | cut -d' ' -f1)

.PHONY: run test test-quick soak bench lint lock venv runtime-venv clean browser-deps ami-smoke

# A venv whose pip does not run is made again: `python -m venv` makes bin/python
# before it installs pip, and leaves the folder behind when that fails (Debian
# without python3-venv, a Ctrl-C), which failed every make after it.
# No prerequisites: the stamp's name is the requirements' checksum, so new contents
# install again, and a checkout that only touched the files (same contents, newer
# times) does not call pip, which needs PyPI.
$(STAMP):
	@$(PY) -m pip --version >/dev/null 2>&1 || test -n "$(PYTHON)" || { echo "make: needs Python 3.11" \
		"or newer (python3 here is $$(python3 --version 2>&1)); install python3.11 (dnf install python3.11)" >&2; \
		exit 1; }
	$(PY) -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

## The tiers alone, for the web or controller instance (README, On real AWS): no embedded
## AWS, browser driver or test tools there. A new .venv, whatever one held before.
## RUNTIME=web leaves out the model's packages too (TensorFlow, OpenVINO: ~1.6 GB), which
## only workers need: requirements-web.txt instead of requirements-runtime.txt.
RUNTIME ?= runtime
# Made beside the one in use and put in its place only once installed: an update does
# not stop the services for pip's minutes (TensorFlow is 1.3 GB), and a failed install
# leaves the old .venv as it was. The scripts the venv wrote name the folder it was made
# in (activate, pip's and gunicorn's first lines): they are made to name .venv. The old
# one is kept as .venv.old until the next time, as the services run from it until they
# are restarted. It goes before the next one is built: each is ~1.75 GB (TensorFlow), and
# three at once, with pip's cache, would fill a default 8 GiB root disk.
runtime-venv:
	@test -n "$(PYTHON)" || { echo "make: needs Python 3.11 or newer" >&2; exit 1; }
	rm -rf $(VENV).old $(VENV).new && $(PYTHON) -m venv $(VENV).new
	$(VENV).new/bin/python -m pip install --quiet --no-cache-dir --upgrade pip
	$(VENV).new/bin/python -m pip install --quiet --no-cache-dir -r requirements-$(RUNTIME).txt -c constraints.txt
	for f in $(VENV).new/bin/*; do test -L "$$f" || ! grep -qI . "$$f" || \
		sed -i 's|$(subst .,\.,$(notdir $(VENV)))\.new|$(notdir $(VENV))|g' "$$f" || exit 1; done
	{ test ! -e $(VENV) || mv $(VENV) $(VENV).old; } && mv $(VENV).new $(VENV)

## Run the whole system on the embedded AWS; the page is at http://127.0.0.1:8000
run: $(STAMP)
	$(PY) -m localaws.stack $(RUN_ARGS)

## The whole test suite (what CI runs): ruff, the tests in two processes, then the soak
## test alone (beside other tests its killed workers' batches would run out of attempts)
TEST_PROCESSES ?= 2
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -m "not soak" -n $(TEST_PROCESSES) --dist loadscope --no-loadscope-reorder \
		--max-worker-restart 1 --durations 15
	$(MAKE) soak

## Unit tests only: no browser and no stack (~5 minutes in two processes here)
test-quick: $(STAMP)
	$(PY) -m pytest -m "not soak and not integration" -n $(TEST_PROCESSES) --dist loadscope --no-loadscope-reorder

## 1,000 images with workers killed at random (minutes)
soak: $(STAMP)
	$(PY) -m pytest -m soak -s

## Benchmarks; figures printed and written to .bench/latest.json
bench: $(STAMP)
	$(PY) -m bench

## The worker image baked and booted for real on this machine, without AWS (ami/README.md,
## Smoke test): Linux, as root; ~3 minutes here, longer where pip fetches TensorFlow afar. Not in make test.
# No $(STAMP): under `sudo make ami-smoke` it would build the venv as root (root's files
# in .venv). smoke.sh says to run `make venv` (as yourself) when there is none.
ami-smoke:
	SMOKE_PYTHON=$(abspath $(PY)) ami/smoke.sh $(SMOKE_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

## Remake constraints.txt from the newest versions requirements.txt allows (then make test).
## With the AMI's Python (3.11): a newer one could pick versions that no longer install there.
LOCK_PYTHON ?= python3.11
lock:
	rm -rf .lock-venv && $(LOCK_PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip setuptools wheel
	.lock-venv/bin/pip install --quiet -r requirements.txt
	{ sed -n '1,2p' constraints.txt; .lock-venv/bin/pip freeze --all | grep -v '^pip=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt && rm -rf .lock-venv

clean:
	rm -rf $(VENV) $(VENV).new $(VENV).old .lock-venv .run .bench .pytest_cache .ruff_cache

## Debian's headless Chromium for the page test, node for a page-script test, and bsdtar for bake.sh's
## (needs root; .ci/run does this)
browser-deps:
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		chromium chromium-driver nodejs libarchive-tools
