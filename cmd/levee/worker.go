package main

import (
	"context"
	"flag"
	"log/slog"
	"os/signal"

	"github.com/levee-gw/levee/gateway"
)

// cmdWorker runs only queue workers, serving /metrics and /healthz on
// --metrics.
func cmdWorker(ctx context.Context, args []string, log *slog.Logger, getenv func(string) string) error {
	fs := flag.NewFlagSet("worker", flag.ContinueOnError)
	path := fs.String("config", "levee.yaml", "config file")
	metricsAddr := fs.String("metrics", "127.0.0.1:9091", "address for /metrics and /healthz (empty: none)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	hup := catchHangup()
	defer signal.Stop(hup)
	cfg, st, err := loadAndOpen(ctx, *path, getenv)
	if err != nil {
		return err
	}
	defer st.Close()
	g, err := gateway.Start(ctx, cfg, st, gateway.Roles{Workers: true, MetricsAddr: *metricsAddr}, log)
	if err != nil {
		return err
	}
	reloadOnHangup(ctx, hup, g, *path, getenv, log)
	log.Info("levee worker running", "deployments", len(cfg.Deployments), "concurrency", cfg.Worker.Concurrency)
	return g.Run(ctx)
}
