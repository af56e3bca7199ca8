// Command demodns is a DNS server built on github.com/miekg/dns and the
// rollover library, serving UDP and TCP on one port: the UDP demo and the
// UDP tests roll it over.
//
// Every query gets one A record (127.0.0.1) and one TXT record that names
// the server: "demodns VERSION gen N pid P".
//
// A bad deploy on purpose, for the bake's tests:
//
//	-fail=crash     the process exits with status 2 on its first query
//	-fail=servfail  every answer is SERVFAIL (reported through rollover.Answer)
//
// It is written exactly as the README's "Serving UDP" pattern.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"github.com/miekg/dns"

	"github.com/rollover-sh/rollover/rollover"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:5353", "address to serve DNS on, over UDP and TCP")
	version := flag.String("version", "v1", "version to report")
	delay := flag.Duration("delay", 0, "time each answer takes")
	fail := flag.String("fail", "", "a bad deploy: crash (exit 2 on the first query) or servfail (every answer)")
	udpOnly := flag.Bool("udp-only", false, "serve UDP only")
	flag.Parse()
	if *fail != "" && *fail != "crash" && *fail != "servfail" {
		fmt.Fprintf(os.Stderr, "demodns: -fail=%q: want crash or servfail\n", *fail)
		os.Exit(2)
	}
	if err := run(*addr, handler(*version, *delay, *fail), !*udpOnly); err != nil {
		fmt.Fprintf(os.Stderr, "demodns: %v\n", err)
		os.Exit(1)
	}
}

func run(addr string, h dns.Handler, withTCP bool) error {
	ctx := context.Background()
	pc, err := rollover.ListenPacket(ctx, "udp", addr)
	if err != nil {
		return err
	}
	servers := []*dns.Server{{PacketConn: pc, Handler: h}}
	if withTCP {
		ln, err := rollover.Listen(ctx, "tcp", addr)
		if err != nil {
			return err
		}
		servers = append(servers, &dns.Server{Listener: ln, Handler: h})
	}
	var wg sync.WaitGroup
	errs := make([]error, len(servers))
	for i, srv := range servers {
		go func() {
			<-rollover.Draining()
			sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			_ = srv.ShutdownContext(sctx)
		}()
		wg.Go(func() {
			// The hand-over ends reads with net.ErrClosed, which may come
			// before Shutdown: that is the end of serving, not an error.
			if err := srv.ActivateAndServe(); err != nil && !errors.Is(err, net.ErrClosed) {
				errs[i] = err
			}
		})
	}
	if err := rollover.Ready(); err != nil {
		return err
	}
	wg.Wait()
	return errors.Join(errs...)
}

func handler(version string, delay time.Duration, fail string) dns.Handler {
	txt := fmt.Sprintf("demodns %s gen %d pid %d", version, rollover.Generation(), os.Getpid())
	return dns.HandlerFunc(func(w dns.ResponseWriter, q *dns.Msg) {
		if fail == "crash" {
			fmt.Fprintln(os.Stderr, "demodns: -fail=crash: exiting on the first query")
			os.Exit(2)
		}
		time.Sleep(delay)
		m := new(dns.Msg)
		m.SetReply(q)
		if fail == "servfail" {
			m.Rcode = dns.RcodeServerFailure
		} else if len(q.Question) == 1 {
			name := q.Question[0].Name
			m.Answer = append(m.Answer,
				&dns.A{Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 0}, A: net.IPv4(127, 0, 0, 1)},
				&dns.TXT{Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeTXT, Class: dns.ClassINET, Ttl: 0}, Txt: []string{txt}})
		}
		err := w.WriteMsg(m)
		rollover.Answer(err != nil || m.Rcode == dns.RcodeServerFailure)
	})
}
