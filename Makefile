# Levee — `make help` lists the targets.
GO ?= go
GOFILES = $(shell git ls-files --cached --others --exclude-standard '*.go' 2>/dev/null || find . -name '*.go' -not -path './.levee/*')

.PHONY: help build run test lint chaos bench bench-go bench-jobs bench-levelling bench-levelling-responses bench-batch bench-scale bench-cost sdk-node deploy-check

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

build: ## build bin/levee
	$(GO) build -o bin/levee ./cmd/levee

run: build ## start the whole stack on embedded defaults (levee dev)
	./bin/levee dev

lint: ## gofmt, go vet, and no tracked file over 1 MB (build outputs are never committed)
	@out=$$(gofmt -l $(GOFILES)); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	@big=$$(git ls-files -z 2>/dev/null | xargs -0 -r du -k --apparent-size 2>/dev/null | awk '$$1 > 1024 {print $$2" ("$$1" KB)"}'); \
	if [ -n "$$big" ]; then echo "tracked files over 1 MB (build outputs or dumps do not belong in git):"; echo "$$big"; exit 1; fi
	$(GO) vet ./...

test: lint ## lint, then every test with the race detector (starts its own Postgres and NATS)
	$(GO) test -race -count=1 -timeout 20m ./...

chaos: ## 10,000 jobs through 2 gateways and 2 workers while NATS and Postgres restart and processes are killed (LEVEE_CHAOS_JOBS to change)
	@out=$$(mktemp); status=0; \
	LEVEE_CHAOS_JOBS=$${LEVEE_CHAOS_JOBS:-10000} $(GO) test -count=1 -timeout 30m -run '^TestChaos$$' -v ./test/ > $$out 2>&1 || status=$$?; \
	grep -v 'level=' $$out | grep -E 'chaos_test|^(---|ok|FAIL|PASS)'; rm -f $$out; exit $$status

deploy-check: ## check deploy/: alert rules and their tests (promtool), the Helm chart, compose, the dashboard, the Dockerfile; builds the image where Docker runs
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing promtool (Debian's prometheus package)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null || exit 1; \
	  else \
	    echo "deploy-check needs promtool: install Debian's prometheus package (apt-get install --no-install-recommends prometheus) or put promtool on PATH"; exit 1; \
	  fi; }
	promtool check rules deploy/prometheus/alerts.yaml
	promtool test rules deploy/prometheus/alerts_test.yaml
	promtool check config deploy/prometheus/prometheus.yml
	@# deploy/check is a module of its own (Helm, Kubernetes and Compose stay out of Levee's go.mod).
	cd deploy/check && GOFLAGS="$$GOFLAGS -mod=mod" $(GO) test -count=1 .
	cd deploy/check && GOFLAGS="$$GOFLAGS -mod=mod" $(GO) run . -root ../..

sdk-node: ## install the pinned openai-node SDK so `make test` also runs it against Levee
	cd test/sdk-node && npm ci --no-audit --no-fund

bench: ## at 2,000 req/s: added p50/p99 against direct and a tcp hop, RSS, CPU and garbage per call, issue 13 goals PASS/MISS; sustained rate; tenant limits checked (zero-latency simulator)
	$(GO) run ./test/bench/proxy -limits

bench-jobs: ## end-to-end jobs/s: submit over HTTP to all succeeded (zero-latency simulator, no limits)
	$(GO) run ./test/bench/jobs

bench-levelling: ## queue-based load levelling with the default config on PTU 60k + standard 120k TPM: steady 40% sync, a 10%→80% spike, night; PASS/MISS per goal (~12 min)
	$(GO) run ./test/bench/levelling

bench-levelling-responses: ## the same, with background responses (POST /v1/responses, background) as the backlog
	$(GO) run ./test/bench/levelling -responses

bench-batch: ## a 50,000-line batch end to end: wall time, lines/s, output checked line for line
	$(GO) run ./test/bench/batch

bench-scale: ## hot paths on an empty database vs one filled with 10M finished jobs (COPY), and a retention pass under claims (LEVEE_SCALE_JOBS to change)
	$(GO) run ./test/bench/scale -jobs $${LEVEE_SCALE_JOBS:-10000000}

bench-cost: ## how cost grows with the work: 1 → 1,000 tenants, 0 → 1M queued jobs, 2 → 50 deployments (flags: go run ./test/bench/cost -h)
	$(GO) run ./test/bench/cost $(BENCH_COST_FLAGS)

bench-go: ## Go micro-benchmarks of the hot paths
	$(GO) test -run '^$$' -bench . -benchmem -count 5 ./broker/ ./api/
