// Package gateway is Levee's one composition root: it builds a running
// process from its roles — the HTTP API, the queue workers, or both — with
// the services every process needs (broker, usage ledger, capacity sharing,
// partition upkeep), and owns the order of its graceful stop. `levee serve`,
// `levee worker`, `levee dev`, the test harness and the benchmarks all start
// processes through it, so they cannot drift apart.
package gateway

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"runtime/debug"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/levee-gw/levee/api"
	"github.com/levee-gw/levee/batch"
	"github.com/levee-gw/levee/broker"
	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/oidc"
	"github.com/levee-gw/levee/outbox"
	"github.com/levee-gw/levee/queue"
	"github.com/levee-gw/levee/quota"
	"github.com/levee-gw/levee/store"
	"github.com/levee-gw/levee/tracing"
	"github.com/levee-gw/levee/webhook"
	"github.com/levee-gw/levee/worker"
)

// Roles are what a process does. levee serve is the API (plus workers when
// worker.enabled), levee worker is workers alone, levee dev is both.
type Roles struct {
	// API serves the HTTP API on cfg.Listen.
	API bool
	// Workers drain the job queue, move batches on, send webhooks and sweep
	// for lost messages. They need a queue (nats_url).
	Workers bool
	// MetricsAddr, for a process without the API, serves /metrics and
	// /healthz there ("" for none). With the API they are on cfg.Listen.
	MetricsAddr string
	// Tracer traces calls and jobs; nil: as the OTEL_* environment
	// variables say (off unless an OTLP endpoint is set).
	Tracer *tracing.Tracer
}

// Gateway is a running Levee process.
type Gateway struct {
	// Addr is the API's address (useful when Listen had port 0); empty
	// without the API role.
	Addr   string
	Broker *broker.Broker
	Ledger *store.Ledger
	// Queue is nil when no NATS URL is configured; Worker is nil unless
	// workers run in this process.
	Queue  *queue.Queue
	Worker *worker.Worker
	// Quota holds the callers' limits and budgets.
	Quota *quota.Quota
	// AdminKey is the bootstrap admin key (auth.admin_key_env), if any.
	AdminKey              string
	cfg                   *config.Config
	log                   *slog.Logger
	tracer                *tracing.Tracer
	prices                *quota.Prices
	reloads, reloadErrors prometheus.Counter
	reloadedAt            prometheus.Gauge
	hs                    *http.Server
	errc                  chan error

	stopWorker     context.CancelFunc
	workerDone     chan struct{}
	stopBackground context.CancelFunc
	background     sync.WaitGroup
}

// RetentionOf is the store's retention policy of cfg (negative: forever).
func RetentionOf(cfg *config.Config) store.Retention {
	keep := func(d time.Duration) time.Duration { return max(d, 0) }
	return store.Retention{Jobs: keep(cfg.Retention.Jobs), Batches: keep(cfg.Retention.Batches), Webhooks: keep(cfg.Retention.Webhooks),
		FailedWebhooks: keep(cfg.Retention.FailedWebhooks), UsageMonths: max(cfg.Retention.UsageMonths, 0), Batch: cfg.Retention.BatchSize}
}

// retentionMetrics registers the sweeper's metrics and returns what records
// a pass.
func retentionMetrics(reg prometheus.Registerer) func(store.Swept, error) {
	deleted := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "levee_retention_deleted_total",
		Help: "Rows (and usage partitions) removed by the retention sweeper, by kind."}, []string{"kind"})
	failures := prometheus.NewCounter(prometheus.CounterOpts{Name: "levee_retention_errors_total", Help: "Retention sweeps that failed part way."})
	last := prometheus.NewGauge(prometheus.GaugeOpts{Name: "levee_retention_last_sweep_timestamp_seconds", Help: "When this process last finished a retention sweep without error."})
	reg.MustRegister(deleted, failures, last)
	return func(s store.Swept, err error) {
		for kind, n := range s {
			deleted.WithLabelValues(kind).Add(float64(n))
		}
		if err != nil {
			failures.Inc()
			return
		}
		last.SetToCurrentTime()
	}
}

// Version is the binary's module version ("(devel)" when built from a
// checkout), as traces name it.
func Version() string {
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" {
		return bi.Main.Version
	}
	return "unknown"
}

// NewRegistry returns a metrics registry with the Go and process collectors.
func NewRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}

// openQueue connects to the job queue configured in cfg (nil when none).
// If JetStream has lost the jobs stream, every queued job's publish mark is
// cleared so it is published again: an accepted job is never left waiting
// for a message that no longer exists.
func openQueue(ctx context.Context, cfg *config.Config, st *store.Store, tracer *tracing.Tracer, log *slog.Logger) (*queue.Queue, error) {
	if cfg.NATSURL == "" {
		return nil, nil
	}
	onLost := func() (int64, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		return st.ForgetPublished(ctx)
	}
	t := cfg.NATSTLS
	q, err := queue.Open(ctx, queue.Config{URL: cfg.NATSURL, Creds: cfg.NATSCreds, Domain: cfg.Queue.Domain,
		TLS:      queue.TLS{CAFile: t.CAFile, CertFile: t.CertFile, KeyFile: t.KeyFile, ServerName: t.ServerName},
		Replicas: cfg.Queue.Replicas, AckWait: cfg.Queue.AckWait, ConsumerIdle: cfg.Queue.ConsumerIdle, Tracer: tracer}, onLost, log)
	if err != nil {
		return nil, fmt.Errorf("%w%s", err, natsHint(err))
	}
	return q, nil
}

// natsHint names the setting to look at when connecting to NATS failed for
// a reason the client's error does not put in Levee's terms.
func natsHint(err error) string {
	var unknownCA x509.UnknownAuthorityError
	var badName x509.HostnameError
	switch {
	case errors.As(err, &unknownCA):
		return " (nats_tls.ca_file must hold the CA that signed the servers' certificates)"
	case errors.As(err, &badName):
		return " (the servers' certificates do not name the host in nats_url: set nats_tls.server_name)"
	case errors.Is(err, nats.ErrSecureConnRequired):
		return " (the servers require TLS: set nats_tls)"
	case errors.Is(err, nats.ErrAuthorization):
		return " (check nats_creds, or the user and password in nats_url)"
	case errors.Is(err, nats.ErrNoResponders) || errors.Is(err, jetstream.ErrJetStreamNotEnabled):
		return " (no JetStream answered: is it enabled on the servers, and is queue.domain right?)"
	}
	return ""
}

// Start builds a process with the given roles and starts it in the
// background. The store must be migrated.
func Start(ctx context.Context, cfg *config.Config, st *store.Store, roles Roles, log *slog.Logger) (_ *Gateway, err error) {
	if roles.Workers && cfg.NATSURL == "" {
		return nil, &config.FieldError{Field: "nats_url", Msg: "required for workers (or set NATS_URL)"}
	}
	tracer := roles.Tracer
	if tracer == nil {
		if tracer, err = tracing.FromEnv(ctx, Version(), log); err != nil {
			return nil, err
		}
	}
	reg := NewRegistry()
	b := broker.New(cfg, broker.NewTokenizers(), broker.NewClient(), reg, log)
	b.SetTracer(tracer)
	q, err := openQueue(ctx, cfg, st, tracer, log)
	if err != nil {
		_ = tracer.Shutdown(context.Background())
		return nil, err
	}
	ledger := st.NewLedger(store.LedgerConfig{FlushInterval: cfg.Usage.FlushInterval, BatchSize: cfg.Usage.BatchSize, BufferSize: cfg.Usage.BufferSize, MaxPending: cfg.Usage.MaxPending}, log)
	g := &Gateway{Broker: b, Ledger: ledger, Queue: q, AdminKey: cfg.Auth.AdminKey, cfg: cfg, log: log, tracer: tracer, errc: make(chan error, 1)}
	defer func() {
		if err != nil {
			_ = ledger.Close(context.Background())
			if q != nil {
				q.Close()
			}
			_ = tracer.Shutdown(context.Background())
		}
	}()
	reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "levee_usage_rows_written_total", Help: "Usage rows written to Postgres."},
		func() float64 { return float64(ledger.Written()) }))
	reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "levee_usage_rows_dropped_total", Help: "Usage rows dropped because the buffer was full."},
		func() float64 { return float64(ledger.Dropped()) }))
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "levee_usage_backlog_rows", Help: "Usage rows recorded and not yet written to Postgres."},
		func() float64 { return float64(ledger.Backlog()) }))

	guard := Guard(cfg)
	prices := quota.NewPrices(cfg, reg)
	g.prices = prices
	g.reloads = prometheus.NewCounter(prometheus.CounterOpts{Name: "levee_config_reloads_total", Help: "Configuration reloads applied (SIGHUP)."})
	g.reloadErrors = prometheus.NewCounter(prometheus.CounterOpts{Name: "levee_config_reload_errors_total",
		Help: "Configuration reloads refused because the new file was invalid (the running configuration stays)."})
	g.reloadedAt = prometheus.NewGauge(prometheus.GaugeOpts{Name: "levee_config_last_reload_success_timestamp_seconds",
		Help: "When the running configuration was loaded (at start or by the last reload applied)."})
	g.reloadedAt.SetToCurrentTime()
	reg.MustRegister(g.reloads, g.reloadErrors, g.reloadedAt)
	qt := quota.New(st, cfg.Pricing.Currency, cfg.DatabaseTimeout, log)
	if err := qt.Refresh(ctx); err != nil {
		return nil, fmt.Errorf("gateway: limits and budgets: %w", err)
	}
	qt.SetAliases(b.AliasesOf)
	reg.MustRegister(quota.NewBudgetCollector(qt, st))
	g.Quota = qt
	var (
		runner *batch.Runner
		relay  *outbox.Relay
	)
	if q != nil {
		runner = batch.New(st, q, b, cfg.Batches.PinDeployments, log)
		relay = outbox.New(st, q, log)
	}
	if roles.Workers {
		wc := worker.ConfigFrom(cfg)
		wc.Tracer = tracer
		g.Worker = worker.New(q, st, b, qt, prices, wc, reg, log)
	}

	var handler http.Handler
	var apiServer *api.Server
	listen := roles.MetricsAddr
	if roles.API {
		opts := api.Options{Config: cfg, Broker: b, Keys: st, Ledger: ledger, Usage: st, DB: st, Registry: reg, Log: log, Guard: guard,
			Quota: qt, Prices: prices, Admin: st, Tracer: tracer}
		if len(cfg.Auth.OIDC.Issuers) > 0 {
			v, err := oidc.New(cfg.Auth.OIDC, nil, log)
			if err != nil {
				return nil, fmt.Errorf("gateway: %w", err)
			}
			opts.OIDC = v
		}
		if q != nil {
			opts.Jobs, opts.Queue, opts.Outbox, opts.Batches, opts.Runner = st, q, relay, st, runner
			if g.Worker != nil {
				opts.Wake = g.Worker.Wake
			}
		}
		apiServer = api.New(opts)
		handler, listen = apiServer.Handler(), cfg.Listen
	} else if listen != "" {
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
		handler = mux
	}
	if handler != nil {
		ln, err := net.Listen("tcp", listen)
		if err != nil {
			return nil, fmt.Errorf("gateway: listen %s: %w", listen, err)
		}
		if roles.API {
			g.Addr = ln.Addr().String()
			// Warm the tokenizers so the first call does not pay for loading them.
			for _, d := range b.Deployments() {
				b.Tokenizers().Count(d.Encoding, "warm")
			}
		}
		g.hs = &http.Server{Handler: handler, ReadHeaderTimeout: cfg.HTTP.ReadHeaderTimeout, IdleTimeout: cfg.HTTP.IdleTimeout}
		go func() { g.errc <- g.hs.Serve(ln) }()
	}

	// Background services run until Shutdown stops them, after the API and
	// the workers have finished: a worker's calls in flight during a
	// graceful stop are still charged to the fleet's shared capacity view.
	bg, cancelBG := context.WithCancel(context.WithoutCancel(ctx))
	g.stopBackground = cancelBG
	g.spawn(func() { st.RunPartitionMaintenance(bg, time.Hour, time.Now, log) })
	g.spawn(func() { st.RunResponsePruning(bg, time.Hour, cfg.Responses.StreamRetention, log) })
	g.spawn(func() {
		st.RunSweeper(bg, cfg.Retention.Interval, time.Now, RetentionOf(cfg), retentionMetrics(reg), log)
	})
	g.spawn(func() { qt.Run(bg) })
	if apiServer != nil {
		g.spawn(func() { apiServer.RunKeys(bg, st) })
	}
	if q != nil {
		sh := broker.NewSharer(q.Conn(), b, "", log)
		g.spawn(func() { _ = sh.Run(bg) })
		g.spawn(func() {
			if err := qt.Share(bg, q.Conn(), ""); err != nil {
				log.Error("sharing limits", "err", err)
			}
		})
		g.spawn(func() { relay.Run(bg) })
		if apiServer != nil {
			g.spawn(func() {
				if err := apiServer.ShareKeys(bg, q.Conn(), ""); err != nil {
					log.Error("sharing key changes", "err", err)
				}
			})
		}
	}
	if g.Worker != nil {
		g.spawn(func() { runner.Run(bg) })
		g.spawn(func() { webhook.NewSender(st, guard, cfg.Webhooks.Schedule, reg, log).Run(bg) })
		wctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
		g.stopWorker, g.workerDone = cancel, make(chan struct{})
		go func() {
			defer close(g.workerDone)
			if err := g.Worker.Run(wctx); err != nil {
				log.Error("workers stopped", "err", err)
			}
		}()
	}
	return g, nil
}

func (g *Gateway) spawn(f func()) {
	g.background.Add(1)
	go func() {
		defer g.background.Done()
		f()
	}()
}

// Reload serves next's deployments, models, policies and prices from now
// on (see config.Reloadable); settings that need a restart are listed, and
// stay as they were. Calls and jobs in flight finish as they started.
// next must be validated.
func (g *Gateway) Reload(next *config.Config) (restartOnly []string) {
	restartOnly = config.RestartOnly(g.cfg, next)
	g.Broker.Reload(next)
	g.prices.Reload(next)
	g.reloads.Inc()
	g.reloadedAt.SetToCurrentTime()
	return restartOnly
}

// ReloadFailed counts a reload refused because the new file was invalid.
func (g *Gateway) ReloadFailed() { g.reloadErrors.Inc() }

// Guard is the SSRF guard configured in cfg.
func Guard(cfg *config.Config) webhook.Guard {
	return webhook.NewGuard(cfg.Webhooks.AllowLoopback, cfg.Webhooks.AllowPrivate)
}

// Done reports a serving error (not a shutdown).
func (g *Gateway) Done() <-chan error { return g.errc }

// Shutdown stops in order: the API stops taking calls and lets in-flight
// ones finish; the workers stop fetching and let in-flight jobs finish (both
// bounded by ctx and the configured shutdown timeout); then the background
// services stop, the queue connection closes and the usage ledger is
// flushed.
func (g *Gateway) Shutdown(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, g.cfg.ShutdownTimeout)
	defer cancel()
	var err error
	if g.hs != nil {
		if err = g.hs.Shutdown(ctx); errors.Is(err, http.ErrServerClosed) {
			err = nil
		}
		if err != nil {
			// Out of time: cut what is still open, so its handlers end
			// (and record their usage) before the ledger is flushed.
			_ = g.hs.Close()
		}
	}
	if g.stopWorker != nil {
		g.stopWorker()
		<-g.workerDone
	}
	g.stopBackground()
	g.background.Wait()
	if g.Queue != nil {
		g.Queue.Close()
	}
	// The ledger's last flush has its own time: the deadline above may have
	// been spent waiting for calls.
	fctx, cancelFlush := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancelFlush()
	if lerr := g.Ledger.Close(fctx); lerr != nil {
		g.log.Error("flushing usage", "err", lerr)
		err = errors.Join(err, lerr)
	}
	if terr := g.tracer.Shutdown(fctx); terr != nil {
		g.log.Warn("exporting the last spans", "err", terr)
	}
	return err
}

// Run serves until ctx ends (a signal), then shuts down.
func (g *Gateway) Run(ctx context.Context) error {
	select {
	case err := <-g.errc:
		return err
	case <-ctx.Done():
	}
	g.log.Info("shutting down")
	return g.Shutdown(context.Background())
}
