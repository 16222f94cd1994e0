package main

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/gateway"
)

// catchHangup takes SIGHUP from now on, before the process has read its
// config: a SIGHUP's default is to end the process, and one sent while it
// starts (migrating, waiting for NATS) would take it down. A SIGHUP caught
// before reloadOnHangup is then a reload, as the file may have changed
// after it was read.
func catchHangup() chan os.Signal {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	return hup
}

// reloadOnHangup reloads the config file at path into g on each SIGHUP
// that hup (from catchHangup) receives, until ctx ends. An invalid file is
// logged with the field at fault and counted; the running configuration
// stays.
func reloadOnHangup(ctx context.Context, hup chan os.Signal, g *gateway.Gateway, path string, getenv func(string) string, log *slog.Logger) {
	go func() {
		defer signal.Stop(hup)
		for {
			select {
			case <-ctx.Done():
				return
			case <-hup:
				reload(g, path, getenv, log)
			}
		}
	}()
}

func reload(g *gateway.Gateway, path string, getenv func(string) string, log *slog.Logger) {
	next, err := config.Load(path, getenv)
	if err != nil {
		g.ReloadFailed()
		var fe *config.FieldError
		if errors.As(err, &fe) {
			log.Error("config reload refused; the running configuration stays", "file", path, "field", fe.Field, "err", fe.Msg)
		} else {
			log.Error("config reload refused; the running configuration stays", "file", path, "err", err)
		}
		return
	}
	restart := g.Reload(next)
	log.Info("config reloaded", "file", path, "deployments", len(next.Deployments), "models", len(next.Models))
	if len(restart) > 0 {
		log.Warn("config reload: these settings changed but take effect only at the next start", "settings", restart)
	}
}
