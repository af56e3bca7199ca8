# The Makefile is the contract: build, test, bench, demo, lint.
GO      ?= go
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X main.version=$(VERSION)

.PHONY: all build test unit fuzz bench demo lint clean

all: build

build:
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/ ./cmd/...

# Everything: lint, every test with the race detector, and a short fuzz of the
# protocol decoder.
test: lint unit fuzz

unit:
	$(GO) test -race -count=1 -timeout 12m ./...

fuzz:
	$(GO) test -run='^$$' -fuzz=FuzzDecode -fuzztime=5s ./rollover/wire/
	$(GO) test -run='^$$' -fuzz=FuzzReader -fuzztime=5s ./rollover/wire/

lint:
	@out="$$(gofmt -l .)"; if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) tool staticcheck ./...

# A demo rollover under load: coordinator + demo app on a free loopback port,
# 32 clients, six rollovers between v1 and v2, then a tally.
demo: build
	./bin/rollover-stress -rollovers 6 -interval 1s -wait

# Every benchmark figure, then the targets: exits 1 if the library/plain
# requests/s ratio is below 0.97 or the idle rollover p50 is over the drain
# grace plus 100ms (see tests/bench.sh for the knobs).
bench: build
	./tests/bench.sh

clean:
	rm -rf bin
