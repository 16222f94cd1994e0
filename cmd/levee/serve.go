package main

import (
	"context"
	"flag"
	"log/slog"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/gateway"
	"github.com/levee-gw/levee/store"
)

func cmdServe(ctx context.Context, args []string, log *slog.Logger, getenv func(string) string) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	path := fs.String("config", "levee.yaml", "config file")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg, err := config.Load(*path, getenv)
	if err != nil {
		return err
	}
	if cfg.DatabaseURL == "" {
		return &config.FieldError{Field: "database_url", Msg: "required (or set DATABASE_URL)"}
	}
	st, err := store.Open(ctx, cfg.DatabaseURL)
	if err != nil {
		return err
	}
	defer st.Close()
	if err := st.Migrate(ctx); err != nil {
		return err
	}
	g, err := gateway.Start(ctx, cfg, st, log)
	if err != nil {
		return err
	}
	log.Info("levee is serving", "addr", g.Addr, "deployments", len(cfg.Deployments))
	return g.Run(ctx)
}
