package main

import (
	"context"
	"flag"
	"log/slog"
	"os/signal"

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
	hup := catchHangup()
	defer signal.Stop(hup)
	cfg, st, err := loadAndOpen(ctx, *path, getenv)
	if err != nil {
		return err
	}
	defer st.Close()
	g, err := gateway.Start(ctx, cfg, st, gateway.Roles{API: true, Workers: cfg.Worker.Enabled}, log)
	if err != nil {
		return err
	}
	reloadOnHangup(ctx, hup, g, *path, getenv, log)
	log.Info("levee is serving", "addr", g.Addr, "deployments", len(cfg.Deployments))
	return g.Run(ctx)
}

// loadAndOpen loads the config file and opens and migrates its database.
func loadAndOpen(ctx context.Context, path string, getenv func(string) string) (*config.Config, *store.Store, error) {
	cfg, err := config.Load(path, getenv)
	if err != nil {
		return nil, nil, err
	}
	if cfg.DatabaseURL == "" {
		return nil, nil, &config.FieldError{Field: "database_url", Msg: "required (or set DATABASE_URL)"}
	}
	st, err := store.Open(ctx, cfg.DatabaseURL, cfg.DatabaseMaxConns)
	if err != nil {
		return nil, nil, err
	}
	if err := st.Migrate(ctx); err != nil {
		st.Close()
		return nil, nil, err
	}
	return cfg, st, nil
}
