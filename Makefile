# Bulwark: build, demo, test, bench.
#
#   make deps    install the system packages the build and tests need (Debian, root)
#   make demo    build, then run example pods through CRI on a private containerd with
#                the shim, and show each limit firing with its reason (root)
#   make demo-cli  the same policy with `bulwark run`, no containerd
#   make test    build everything and run every test (root: it starts containerd)
#   make test-matrix  the CRI suite on containerd 1.7.24 and 2.1.9 as well
#   make test-cgroup2 the CRI suite on cgroup v2 in a VM, cgroupfs and systemd drivers
#   make kind-test    Bulwark in a kind cluster (machines with Docker and kind only)
#   make bench   print the benchmark tables: the runtime, pods through CRI (root), and
#                serving next to `wasmtime serve` (built once into build/wasmtime)
#   make soak    2,000 pod lifecycles through CRI, 10 at a time (root)
#   make fuzz    every fuzz target for FUZZ_SECONDS each (default 600; `make test` runs 15)
#   make lint    rustfmt and clippy, warnings as errors

CARGO      ?= cargo
BUILD      := build
GUESTS     := $(BUILD)/guests
COMPONENTS := $(BUILD)/components
NATIVE     := $(BUILD)/native
BIN        := target/x86_64-unknown-linux-gnu/release
BULWARK    := $(BIN)/bulwark
PEER       := $(BUILD)/wasmtime/bin/wasmtime
# componentize-py builds the big wasi:http component (CPython inside, ~18 MB) from PyPI.
PYVENV     := $(BUILD)/venv
COMPONENTIZE_PY_VERSION := 0.25.1
WASMTIME_VERSION := $(shell sed -n 's/^wasmtime = .*version = "=\{0,1\}\([0-9.]*\)".*/\1/p' Cargo.toml | head -1)
# The C guests that also exist as WASI preview 2 command components.
COMPONENT_GUESTS := hello echo exit cat fileio passwd membomb sleep cpu escape

APT_PACKAGES := libc6-dev clang lld wasi-libc libclang-rt-14-dev-wasm32 wabt \
	containerd runc containernetworking-plugins iproute2 docker-registry skopeo \
	busybox-static protobuf-compiler wrk python3-venv

.PHONY: all build guests components deps demo demo-cli test test-matrix test-cgroup2 installer-image kind-test bench soak fuzz lint clean

all: build guests

# One release build for the binaries, the tests and the benchmarks: Wasmtime is slow to
# compile on small machines and the tests need optimised code to run limits quickly.
build: deps
	$(CARGO) build --release --workspace --bins

guests: deps
	$(MAKE) -C images/guests OUT=$(CURDIR)/$(GUESTS) NATIVE_OUT=$(CURDIR)/$(NATIVE)

components: guests build
	@mkdir -p $(COMPONENTS)
	@for guest in $(COMPONENT_GUESTS); do \
		if [ ! $(COMPONENTS)/$$guest.wasm -nt $(GUESTS)/$$guest.wasm ]; then \
			echo "componentize $$guest"; \
			$(BIN)/componentize $(GUESTS)/$$guest.wasm $(COMPONENTS)/$$guest.wasm || exit 1; \
		fi; \
	done
	@if [ ! $(COMPONENTS)/httpd.wasm -nt $(GUESTS)/httpd.wasm ]; then \
		echo "componentize --http httpd"; \
		$(BIN)/componentize --http $(GUESTS)/httpd.wasm $(COMPONENTS)/httpd.wasm || exit 1; \
	fi
	@if [ ! $(COMPONENTS)/pyhttp.wasm -nt images/guests/python/app.py ]; then \
		echo "componentize-py pyhttp"; \
		[ -x $(PYVENV)/bin/componentize-py ] || { python3 -m venv $(PYVENV) && \
			$(PYVENV)/bin/pip install -q componentize-py==$(COMPONENTIZE_PY_VERSION); } || exit 1; \
		set -- $$($(BIN)/componentize --http-wit) && \
		$(PYVENV)/bin/componentize-py -q -d $$1 -w $$2 componentize -p images/guests/python \
			-o $(COMPONENTS)/pyhttp.wasm app || exit 1; \
	fi
	@if [ ! $(COMPONENTS)/pyhttp-p3.wasm -nt images/guests/p3/http/app.py ]; then \
		echo "componentize-py pyhttp-p3"; \
		$(PYVENV)/bin/componentize-py -q -d $$($(BIN)/componentize --p3-wit) -w wasi:http/service@0.3.0 \
			componentize -p images/guests/p3/http -o $(COMPONENTS)/pyhttp-p3.wasm app || exit 1; \
	fi
	@if [ ! $(COMPONENTS)/pycmd-p3.wasm -nt images/guests/p3/command/app.py ]; then \
		echo "componentize-py pycmd-p3"; \
		$(PYVENV)/bin/componentize-py -q -d $$($(BIN)/componentize --p3-wit) -w wasi:cli/command@0.3.0 \
			componentize -p images/guests/p3/command -o $(COMPONENTS)/pycmd-p3.wasm app || exit 1; \
	fi
	@if [ ! $(COMPONENTS)/p3-command.wasm -nt images/guests/p3/command.wat ]; then \
		echo "componentize --wat p3-command"; \
		$(BIN)/componentize --wat images/guests/p3/command.wat $(COMPONENTS)/p3-command.wasm || exit 1; \
	fi

deps:
	@bash tests/chart/get-helm.sh
	@missing=""; for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

# The main job: a private containerd with the shim, pods through CRI, limits firing.
demo: build guests
	$(BIN)/bulwark-demo

# The same policy on the command line, no containerd needed.
demo-cli: build guests
	@./images/demo.sh $(BULWARK) $(GUESTS)

test: build guests components
	$(CARGO) test --release --workspace
	bash tests/chart/test.sh

# The installer image the Helm chart runs (an OCI layout; push it with skopeo, or
# `skopeo copy oci:build/installer-image:latest oci-archive:installer.tar` for kind load).
installer-image: build
	$(BIN)/installer-image --oci-layout $(BUILD)/installer-image --name bulwark-installer:latest

# Bulwark in a kind cluster (needs Docker and kind; says so and exits 2 where they are missing).
kind-test:
	bash tests/kind/run.sh

# The CRI suite on the newer containerd releases too (Debian trixie's and sid's), less the
# tests that pin 1.7.24 themselves (OCI artifacts need >= 1.7.7): `make test` ran those.
PINNED_TESTS := --skip oci_wasm_artifacts_run_on_containerd_1_7 \
	--skip a_serving_oci_wasm_artifact_answers_on_containerd_1_7 \
	--skip a_100_mib_module_runs_and_no_shim_holds_it_in_memory
test-matrix: build guests components
	BULWARK_TEST_CONTAINERD=1.7.24 $(CARGO) test --release --workspace --test cri -- $(PINNED_TESTS)
	BULWARK_TEST_CONTAINERD=2.1.9 $(CARGO) test --release --workspace --test cri -- $(PINNED_TESTS)

# The CRI suite on a cgroup v2 node: a throwaway QEMU VM on this machine's root, with
# kubelet's systemd and cgroupfs drivers, and on cgroup v1 with systemd (tests/vm/README.md).
# CGROUP2_SCOPE=ci (CI): a chosen few tests on each (tests/vm/cgroup2.sh).
CGROUP2_SCOPE ?= full
test-cgroup2: build guests components
	bash tests/vm/cgroup2.sh $(CGROUP2_SCOPE)

bench: build guests components $(PEER)
	$(CARGO) bench --workspace --bench runtime --bench pods --bench serve

# The serving benchmark's peer: `wasmtime serve` at Bulwark's Wasmtime version, built once
# (a long build; `make bench` only, never CI).
$(PEER):
	$(CARGO) install --locked wasmtime-cli --version $(WASMTIME_VERSION) --root $(BUILD)/wasmtime

SOAK_LIFECYCLES ?= 2000
soak: build guests components
	BULWARK_SOAK_LIFECYCLES=$(SOAK_LIFECYCLES) $(CARGO) test --release --workspace --test soak -- --nocapture

FUZZ_SECONDS ?= 600
fuzz: build guests
	BULWARK_FUZZ_SECONDS=$(FUZZ_SECONDS) $(CARGO) test --release --workspace --test parsers --test modules --test escape -- --nocapture

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
	rm -rf $(BUILD)
