package main

import (
	"context"
	"errors"
	"flag"
	"log/slog"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/levee-gw/levee/batch"
	"github.com/levee-gw/levee/broker"
	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/gateway"
	"github.com/levee-gw/levee/worker"
)

// cmdWorker runs only queue workers, serving /metrics on --metrics.
func cmdWorker(ctx context.Context, args []string, log *slog.Logger, getenv func(string) string) error {
	fs := flag.NewFlagSet("worker", flag.ContinueOnError)
	path := fs.String("config", "levee.yaml", "config file")
	metricsAddr := fs.String("metrics", "127.0.0.1:9091", "address for /metrics and /healthz (empty: none)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg, st, err := loadAndOpen(ctx, *path, getenv)
	if err != nil {
		return err
	}
	defer st.Close()
	if cfg.NATSURL == "" {
		return &config.FieldError{Field: "nats_url", Msg: "required for workers (or set NATS_URL)"}
	}
	reg := gateway.NewRegistry()
	b := broker.New(cfg, broker.NewTokenizers(), broker.NewClient(), reg, log)
	q, err := gateway.OpenQueue(ctx, cfg, st, log)
	if err != nil {
		return err
	}
	defer q.Close()
	w := worker.New(q, st, b, worker.ConfigFrom(cfg), reg, log)
	sh := broker.NewSharer(q.Conn(), b, "", log)
	go func() { _ = sh.Run(ctx) }()
	go batch.New(st, q, b, cfg.Batches.PinDeployments, log).Run(ctx)
	go gateway.NewSender(st, cfg, log).Run(ctx)
	if *metricsAddr != "" {
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
		hs := &http.Server{Addr: *metricsAddr, Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		go func() {
			if err := hs.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("metrics server", "err", err)
			}
		}()
		defer hs.Close()
	}
	log.Info("levee worker running", "deployments", len(cfg.Deployments), "concurrency", cfg.Worker.Concurrency)
	return w.Run(ctx)
}
