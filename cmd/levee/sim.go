package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/sim"
)

func cmdSim(ctx context.Context, args []string, out io.Writer, log *slog.Logger) error {
	fs := flag.NewFlagSet("sim", flag.ContinueOnError)
	listen := fs.String("listen", "127.0.0.1:8090", "address to serve on")
	path := fs.String("config", "", "simulator config (YAML: api_key, deployments); default: levee dev's deployments")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var cfg sim.Config
	if *path != "" {
		raw, err := os.ReadFile(*path)
		if err != nil {
			return err
		}
		if err := yaml.Unmarshal(raw, &cfg); err != nil {
			return fmt.Errorf("%s: %w", *path, err)
		}
	} else {
		cfg.APIKey = "sim-key"
		for _, d := range dev.DefaultFile().Deployments {
			sd := d.Sim
			sd.Name, sd.Model, sd.Kind, sd.TPM, sd.RPM = d.Name, d.Model, string(d.Kind), d.TPM, d.RPM
			cfg.Deployments = append(cfg.Deployments, sd)
		}
	}
	s, err := sim.New(cfg)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	hs := &http.Server{Handler: s, ReadHeaderTimeout: 10 * time.Second}
	go func() { <-ctx.Done(); _ = hs.Close() }()
	fmt.Fprintf(out, "simulator on http://%s (key %q); counters: GET /sim/stats; faults: PUT /sim/deployments/{name}/faults\n", ln.Addr(), cfg.APIKey)
	log.Info("simulator serving", "deployments", len(cfg.Deployments))
	if err := hs.Serve(ln); err != nil && err != http.ErrServerClosed {
		return err
	}
	return nil
}
