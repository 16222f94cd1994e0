package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strings"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/dev"
)

func cmdDev(ctx context.Context, args []string, out io.Writer, log *slog.Logger, getenv func(string) string) error {
	fs := flag.NewFlagSet("dev", flag.ContinueOnError)
	listen := fs.String("listen", config.DefaultListen, "gateway address")
	dataDir := fs.String("data-dir", ".levee", "where the private Postgres cluster, NATS data and dev key live")
	file := fs.String("config", "", "a dev file overriding deployments and simulator limits (see deploy/dev.example.yaml)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	o := dev.StackOptions{Listen: *listen, DataDir: *dataDir, DatabaseURL: getenv("DATABASE_URL"), NATSURL: getenv("NATS_URL"),
		APIKey: getenv("LEVEE_DEV_API_KEY"), AdminKey: getenv("LEVEE_ADMIN_KEY"), Log: log}
	if *file != "" {
		f, err := dev.LoadFile(*file)
		if err != nil {
			return err
		}
		o.File = f
	}
	log.Info("starting the embedded stack", "data_dir", *dataDir)
	s, err := dev.StartStack(ctx, o)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, `
Levee is ready.
  OpenAI base URL:  %s/v1
  Azure endpoint:   %s
  API key:          %s
  admin key:        %s  (the admin API: %s/admin/v1/)
  console:          %s/console/  (sign in with the admin key)
  models:           %s
  simulator:        %s  (counters: GET /sim/stats)
  DATABASE_URL=%s
  NATS_URL=%s

Try:
  curl -s %s/v1/chat/completions -H "Authorization: Bearer %s" \
    -H "Content-Type: application/json" \
    -d '{"model":"gpt-4o","messages":[{"role":"user","content":"Hello"}],"max_tokens":50}'

Ctrl-C stops everything.
`, s.BaseURL, s.BaseURL, s.APIKey, s.Gateway.AdminKey, s.BaseURL, s.BaseURL, strings.Join(s.Gateway.Broker.Models(), ", "), s.SimURL, s.DatabaseURL, config.RedactNATSURL(s.NATSURL), s.BaseURL, s.APIKey)
	select {
	case err = <-s.Gateway.Done():
	case <-ctx.Done():
	}
	log.Info("stopping")
	if serr := s.Stop(context.Background()); serr != nil && err == nil {
		err = serr
	}
	return err
}
