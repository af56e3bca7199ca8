# The Makefile is the contract: build, test, bench, demo, lint.
GO      ?= go
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X main.version=$(VERSION)

# Install locations, the GNU way: `make install PREFIX=/usr DESTDIR=/tmp/pkg`.
PREFIX  ?= /usr/local
BINDIR  ?= $(PREFIX)/bin
DATADIR ?= $(PREFIX)/share
INSTALL ?= install

.PHONY: all build test unit fuzz bench soak demo lint readme clean install uninstall

all: build

build:
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/ ./cmd/...

# What deploy/ ships, rendered for BINDIR and installed under
# $(DATADIR)/rollover/, not where systemd, supervisord or sysctl.d would pick
# it up: the units and the program are examples for an app "api" (its user,
# binary and port), so installing them must not enable anything. Copy the
# one you want into /etc (each file's header says how).
DEPLOYDIR ?= $(DATADIR)/rollover
DEPLOY    := systemd/rollover-api.service systemd/rollover@.service supervisor/rollover-api.conf sysctl/90-rollover.conf

# rollover, its shell completions (bash-completion, zsh, fish look there) and
# the deploy files above.
install:
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/rollover ./cmd/rollover
	mkdir -p bin/completion
	bin/rollover completion bash > bin/completion/rollover.bash
	bin/rollover completion zsh > bin/completion/_rollover
	bin/rollover completion fish > bin/completion/rollover.fish
	$(INSTALL) -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(DATADIR)/bash-completion/completions \
		$(DESTDIR)$(DATADIR)/zsh/site-functions $(DESTDIR)$(DATADIR)/fish/vendor_completions.d
	$(INSTALL) -m 0755 bin/rollover $(DESTDIR)$(BINDIR)/rollover
	$(INSTALL) -m 0644 bin/completion/rollover.bash $(DESTDIR)$(DATADIR)/bash-completion/completions/rollover
	$(INSTALL) -m 0644 bin/completion/_rollover $(DESTDIR)$(DATADIR)/zsh/site-functions/_rollover
	$(INSTALL) -m 0644 bin/completion/rollover.fish $(DESTDIR)$(DATADIR)/fish/vendor_completions.d/rollover.fish
	set -e; for f in $(DEPLOY); do \
		$(INSTALL) -d $(DESTDIR)$(DEPLOYDIR)/$$(dirname $$f); \
		sed 's|/usr/local/bin/rollover\b|$(BINDIR)/rollover|g' deploy/$$f > $(DESTDIR)$(DEPLOYDIR)/$$f; \
		chmod 0644 $(DESTDIR)$(DEPLOYDIR)/$$f; \
	done

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/rollover $(DESTDIR)$(DATADIR)/bash-completion/completions/rollover \
		$(DESTDIR)$(DATADIR)/zsh/site-functions/_rollover $(DESTDIR)$(DATADIR)/fish/vendor_completions.d/rollover.fish
	rm -f $(addprefix $(DESTDIR)$(DEPLOYDIR)/,$(DEPLOY))
	-rmdir $(DESTDIR)$(DEPLOYDIR)/systemd $(DESTDIR)$(DEPLOYDIR)/supervisor $(DESTDIR)$(DEPLOYDIR)/sysctl $(DESTDIR)$(DEPLOYDIR) 2>/dev/null

# Everything: lint, every test with the race detector, and a short fuzz of the
# protocol decoder. The fuzz budgets are counts of executions, not durations:
# go1.26's fuzz coordinator can fail a duration-bounded run with a bare
# "context deadline exceeded" at the -fuzztime boundary on a loaded machine
# (golang/go#75804, fixed in go1.27), with no failing input.
test: lint unit fuzz

unit:
	$(GO) test -race -count=1 -timeout 12m ./...

fuzz:
	$(GO) test -run='^$$' -fuzz=FuzzDecode -fuzztime=200000x ./rollover/wire/
	$(GO) test -run='^$$' -fuzz=FuzzReader -fuzztime=500x ./rollover/wire/

# The long runs: TestZeroDrop with its hundred rollovers in every variant
# (make test gives the tcp_migrate_req=1 ones 40).
soak:
	ROLLOVER_SOAK=1 $(GO) test -race -count=1 -timeout 30m -run 'TestZeroDrop' -v ./tests/

# Rewrite the README's sample outputs from real runs (make test checks them).
readme:
	$(GO) test -count=1 -run TestReadmeOutputs ./tests/ -update

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
