// Package gateway assembles one running Levee gateway process from its
// parts — broker, usage ledger, API, HTTP server — and owns its graceful
// stop. `levee serve`, `levee dev`, the test harness and the benchmarks all
// start gateways through it, so they run the same wiring.
package gateway

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/levee-gw/levee/api"
	"github.com/levee-gw/levee/batch"
	"github.com/levee-gw/levee/broker"
	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/queue"
	"github.com/levee-gw/levee/store"
	"github.com/levee-gw/levee/webhook"
	"github.com/levee-gw/levee/worker"
)

// Gateway is a serving gateway.
type Gateway struct {
	// Addr is the address it listens on (useful when Listen had port 0).
	Addr   string
	Broker *broker.Broker
	Ledger *store.Ledger
	// Queue is nil when no NATS URL is configured; Worker is nil unless
	// workers run in this process.
	Queue          *queue.Queue
	Worker         *worker.Worker
	cfg            *config.Config
	hs             *http.Server
	errc           chan error
	log            *slog.Logger
	stopWorker     context.CancelFunc
	workerDone     chan struct{}
	stopBackground context.CancelFunc
}

// NewRegistry returns a metrics registry with the Go and process collectors.
func NewRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}

// OpenQueue connects to the job queue configured in cfg (nil when none).
// If JetStream has lost the jobs stream, every queued job's publish mark is
// cleared so the sweeper publishes it again: an accepted job is never left
// waiting for a message that no longer exists.
func OpenQueue(ctx context.Context, cfg *config.Config, st *store.Store, log *slog.Logger) (*queue.Queue, error) {
	if cfg.NATSURL == "" {
		return nil, nil
	}
	onLost := func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := st.ForgetPublished(ctx); err != nil {
			log.Error("clearing publish marks after the jobs stream was lost", "err", err)
		}
	}
	return queue.Open(ctx, queue.Config{URL: cfg.NATSURL, Replicas: cfg.Queue.Replicas, AckWait: cfg.Queue.AckWait, ConsumerIdle: cfg.Queue.ConsumerIdle}, onLost, log)
}

// Start listens on cfg.Listen and serves in the background; with
// cfg.Worker.Enabled it also runs queue workers. The store must be migrated.
func Start(ctx context.Context, cfg *config.Config, st *store.Store, log *slog.Logger) (*Gateway, error) {
	reg := NewRegistry()
	b := broker.New(cfg, broker.NewTokenizers(), broker.NewClient(), reg, log)
	q, err := OpenQueue(ctx, cfg, st, log)
	if err != nil {
		return nil, err
	}
	ledger := st.NewLedger(store.LedgerConfig{FlushInterval: cfg.Usage.FlushInterval, BatchSize: cfg.Usage.BatchSize, BufferSize: cfg.Usage.BufferSize, MaxPending: cfg.Usage.MaxPending}, log)
	reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "levee_usage_rows_written_total", Help: "Usage rows written to Postgres."},
		func() float64 { return float64(ledger.Written()) }))
	reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "levee_usage_rows_dropped_total", Help: "Usage rows dropped because the buffer was full."},
		func() float64 { return float64(ledger.Dropped()) }))
	opts := api.Options{Config: cfg, Broker: b, Keys: st, Ledger: ledger, Usage: st, DB: st, Registry: reg, Log: log, Guard: Guard(cfg)}
	var w *worker.Worker
	var runner *batch.Runner
	if q != nil {
		opts.Jobs, opts.Queue = st, q
		runner = batch.New(st, q, b, cfg.Batches.PinDeployments, log)
		opts.Batches, opts.Runner = st, runner
		if cfg.Worker.Enabled {
			w = worker.New(q, st, b, worker.ConfigFrom(cfg), reg, log)
			opts.Wake = w.Wake
		}
	}
	srv := api.New(opts)

	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		_ = ledger.Close(context.Background())
		if q != nil {
			q.Close()
		}
		return nil, fmt.Errorf("gateway: listen %s: %w", cfg.Listen, err)
	}
	// Warm the tokenizers so the first call does not pay for loading them.
	for _, d := range b.Deployments() {
		b.Tokenizers().Count(d.Encoding, "warm")
	}
	g := &Gateway{Addr: ln.Addr().String(), Broker: b, Ledger: ledger, Queue: q, Worker: w, cfg: cfg, log: log, errc: make(chan error, 1),
		hs: &http.Server{Handler: srv.Handler(), ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 120 * time.Second}}
	go func() { g.errc <- g.hs.Serve(ln) }()
	bg, cancelBG := context.WithCancel(context.WithoutCancel(ctx))
	g.stopBackground = cancelBG
	if q != nil {
		// Processes sharing deployments keep one capacity view over NATS.
		sh := broker.NewSharer(q.Conn(), b, "", log)
		go func() { _ = sh.Run(bg) }()
	}
	if runner != nil && w != nil {
		go runner.Run(bg) // batches and webhooks move on where workers run
		go NewSender(st, cfg, log).Run(bg)
	}
	if w != nil {
		wctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
		g.stopWorker, g.workerDone = cancel, make(chan struct{})
		go func() {
			defer close(g.workerDone)
			if err := w.Run(wctx); err != nil {
				log.Error("workers stopped", "err", err)
			}
		}()
	}
	return g, nil
}

// NewSender builds the webhook sender configured in cfg.
func NewSender(st *store.Store, cfg *config.Config, log *slog.Logger) *webhook.Sender {
	return webhook.NewSender(st, Guard(cfg), cfg.Webhooks.Schedule, log)
}

// Guard is the SSRF guard configured in cfg.
func Guard(cfg *config.Config) webhook.Guard {
	return webhook.Guard{AllowLoopback: cfg.Webhooks.AllowLoopback, AllowPrivate: cfg.Webhooks.AllowPrivate}
}

// Done reports a serving error (not a shutdown).
func (g *Gateway) Done() <-chan error { return g.errc }

// Shutdown stops accepting calls, lets in-flight ones finish (bounded by ctx
// and the configured shutdown timeout) and flushes the usage ledger.
func (g *Gateway) Shutdown(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, g.cfg.ShutdownTimeout)
	defer cancel()
	err := g.hs.Shutdown(ctx)
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	if g.stopWorker != nil {
		g.stopWorker()
		<-g.workerDone
	}
	g.stopBackground()
	if g.Queue != nil {
		g.Queue.Close()
	}
	if lerr := g.Ledger.Close(ctx); lerr != nil {
		g.log.Error("flushing usage", "err", lerr)
		err = errors.Join(err, lerr)
	}
	return err
}

// Run serves until ctx ends, then shuts down.
func (g *Gateway) Run(ctx context.Context) error {
	select {
	case err := <-g.errc:
		return err
	case <-ctx.Done():
	}
	g.log.Info("shutting down")
	return g.Shutdown(context.Background())
}
