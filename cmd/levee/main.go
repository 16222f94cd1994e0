// Command levee is the Levee gateway: one binary whose subcommands run the
// gateway (serve), the whole stack on embedded defaults (dev), the Azure
// OpenAI simulator (sim), and the administration of tenants and keys.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"
)

const usage = `levee — an LLM gateway that never wastes paid capacity.

Usage:
  levee dev    [--listen ADDR] [--data-dir DIR] [--config FILE]   run everything on embedded defaults
  levee serve  --config FILE                                      run the gateway (and workers if worker.enabled)
  levee worker --config FILE [--metrics ADDR]                     run only queue workers
  levee sim    [--listen ADDR] [--config FILE]                    run the Azure OpenAI simulator
  levee batch submit FILE.jsonl [--endpoint E] [--wait] [--output F]  upload and run a batch, with progress
  levee batch status BATCH_ID                                     a batch's status and counts
                               (--url/LEVEE_URL, --api-key/LEVEE_API_KEY)
  levee migrate                 [--database-url URL]              apply database migrations
  levee config check FILE                                         validate a config as serve would, and show what it serves
  levee tenant create NAME [--default-priority P]                 create a tenant
  levee tenant list                                               list tenants
  levee tenant update NAME [--default-priority P] [--tpm N] [--rpm N] [--concurrency N]
                           [--model ALIAS] [--budget 500USD/month] [--budget-tokens N/day]
                           [--reset-at T] [--soft 0.8] [--on-budget wait|fail] [--no-budget]
                           [--config levee.yaml]                  set a tenant's limits and budget
  levee tenant delete NAME [--force]                              delete a tenant (--force cancels its work)
  levee key create --tenant NAME [--name L] [--models a,b] [--endpoints chat,jobs]
                   [--max-priority P] [--cidrs 10.0.0.0/8] [--expires 720h]
                                                                  create an API key (printed once)
  levee key list --tenant NAME                                    list a tenant's keys
  levee key update KEY_ID [the scope flags of create] [the flags of tenant update]
                                                                  change a key's scopes, limits and budget
  levee key revoke KEY_ID                                         revoke a key (every process within seconds)
  levee key rotate KEY_ID [--grace 24h]                           a new secret; the old one works for --grace
  levee admin-key create [--name L] | revoke ID                   keys for the admin API (/admin/v1/)
  levee usage export [--group-by tenant,key,model,deployment,day] [--start-date D] [--end-date D]
                     [--tenant NAME] [--csv]                      usage and cost across tenants
  (all take --database-url URL, else $DATABASE_URL; changes are audited as cli:$USER)

Environment: DATABASE_URL (else levee dev runs a private cluster), NATS_URL,
LEVEE_DEV_API_KEY (fixes the key levee dev prints), LEVEE_ADMIN_KEY (an admin key every process
accepts), LEVEE_LOG_LEVEL (debug|info|warn|error).
`

func main() {
	// A gateway's live heap is small and its garbage rate high (tens of KB
	// per call): collecting at 4x the live heap instead of 2x halves GC work
	// and its latency spikes. GOGC in the environment still wins.
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(400)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Getenv); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintln(os.Stderr, "levee:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout io.Writer, getenv func(string) string) error {
	if len(args) == 0 {
		fmt.Fprint(stdout, usage)
		return nil
	}
	log := newLogger(getenv("LEVEE_LOG_LEVEL"))
	switch args[0] {
	case "serve":
		return cmdServe(ctx, args[1:], log, getenv)
	case "batch":
		return cmdBatch(ctx, args[1:], stdout, getenv)
	case "worker":
		return cmdWorker(ctx, args[1:], log, getenv)
	case "dev":
		return cmdDev(ctx, args[1:], stdout, log, getenv)
	case "sim":
		return cmdSim(ctx, args[1:], stdout, log)
	case "migrate":
		return cmdMigrate(ctx, args[1:], stdout, getenv)
	case "tenant":
		return cmdTenant(ctx, args[1:], stdout, getenv)
	case "key":
		return cmdKey(ctx, args[1:], stdout, getenv)
	case "admin-key":
		return cmdAdminKey(ctx, args[1:], stdout, getenv)
	case "usage":
		return cmdUsage(ctx, args[1:], stdout, getenv)
	case "config":
		return cmdConfig(args[1:], stdout, getenv)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	}
	return fmt.Errorf("unknown command %q\n\n%s", args[0], usage)
}

func newLogger(level string) *slog.Logger {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		l = slog.LevelInfo
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: l}))
}
