package dev

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/gateway"
	"github.com/levee-gw/levee/sim"
	"github.com/levee-gw/levee/store"
	"github.com/levee-gw/levee/tracing"
)

// File is what `levee dev --config` reads: deployments (each with the
// simulator's behaviour for it), model aliases, and gateway settings. The
// endpoint and credential of every deployment are filled in by dev: they
// point at the embedded simulator.
type File struct {
	Deployments []FileDeployment `yaml:"deployments"`
	Models      []config.Model   `yaml:"models"`
	Circuit     config.Circuit   `yaml:"circuit"`
	Usage       config.Usage     `yaml:"usage"`
	Queue       config.Queue     `yaml:"queue"`
	Worker      config.Worker    `yaml:"worker"`
	Retention   config.Retention `yaml:"retention"`
	Webhooks    config.Webhooks  `yaml:"webhooks"`
	HTTP        config.HTTP      `yaml:"http"`
	Auth        config.Auth      `yaml:"auth"`
	Pricing     config.Pricing   `yaml:"pricing"`
	// DatabaseMaxConns sizes the gateway's Postgres pool; DatabaseTimeout
	// bounds a request's wait on it.
	DatabaseMaxConns int           `yaml:"database_max_conns"`
	DatabaseTimeout  time.Duration `yaml:"database_timeout"`
}

// FileDeployment is a gateway deployment plus how the simulator serves it.
type FileDeployment struct {
	Name     string        `yaml:"name"`
	Model    string        `yaml:"model"`
	Kind     config.Kind   `yaml:"kind"`
	TPM      int           `yaml:"tpm"`
	RPM      int           `yaml:"rpm"`
	Region   string        `yaml:"region"`
	Priority int           `yaml:"priority"`
	Weight   int           `yaml:"weight"`
	Timeout  time.Duration `yaml:"timeout"`
	// SyncReserve overrides worker.sync_reserve for this deployment.
	SyncReserve config.SyncReserve `yaml:"sync_reserve"`
	// Sim is the simulator's side; its TPM/RPM default to the deployment's.
	Sim sim.Deployment `yaml:"sim"`
}

// DefaultFile is what `levee dev` runs without --config: a provisioned and a
// standard gpt-4o deployment behind one alias, and an embeddings deployment.
func DefaultFile() *File {
	chat := sim.Deployment{TTFT: 150 * time.Millisecond, PerToken: 8 * time.Millisecond, Jitter: 0.3, CompletionTokens: 24}
	return &File{
		Deployments: []FileDeployment{
			{Name: "gpt-4o-ptu", Model: "gpt-4o", Kind: config.Provisioned, TPM: 60_000, Region: "swedencentral", Priority: 0, Sim: chat},
			{Name: "gpt-4o-standard", Model: "gpt-4o", Kind: config.Standard, TPM: 120_000, Region: "eastus2", Priority: 0, Sim: chat},
			{Name: "text-embedding-3-small", Model: "text-embedding-3-small", Kind: config.Standard, TPM: 350_000, Region: "eastus2",
				Sim: sim.Deployment{Embedding: 40 * time.Millisecond, Jitter: 0.3}},
		},
		Models: []config.Model{
			{Name: "gpt-4o", Deployments: []string{"gpt-4o-ptu", "gpt-4o-standard"}, MaxTokens: 4096, MaxN: 4},
			{Name: "text-embedding-3-small", Deployments: []string{"text-embedding-3-small"}},
		},
	}
}

// LoadFile reads a dev file; unknown fields are errors.
func LoadFile(path string) (*File, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("dev: %w", err)
	}
	var f File
	dec := yaml.NewDecoder(bytes.NewReader(raw))
	dec.KnownFields(true)
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("dev: %s: %w", path, err)
	}
	return &f, nil
}

// StackOptions configure a whole embedded stack.
type StackOptions struct {
	// Listen is the gateway's address (":0"-style ports allowed).
	Listen string
	// DataDir holds the Postgres cluster, NATS storage and the dev key.
	DataDir string
	// DatabaseURL and NATSURL, when set, are used instead of embedded ones;
	// NATSCreds and NATSTLS go with NATSURL.
	DatabaseURL, NATSURL string
	NATSCreds            string
	NATSTLS              config.NATSTLS
	File                 *File
	// APIKey fixes the printed key (LEVEE_DEV_API_KEY).
	APIKey string
	// AdminKey is accepted on the admin API (LEVEE_ADMIN_KEY; empty: a
	// fresh one each start).
	AdminKey string
	// Ephemeral runs Postgres without fsync (tests, benchmarks).
	Ephemeral bool
	// NoWorkers leaves queue workers to other processes (tests of
	// `levee worker`); levee dev runs them in-process.
	NoWorkers bool
	// Tracer traces the gateway (tests); nil: from OTEL_* variables.
	Tracer *tracing.Tracer
	Log    *slog.Logger
}

// Stack is a running embedded stack.
type Stack struct {
	Gateway     *gateway.Gateway
	Config      *config.Config
	Store       *store.Store
	Sim         *sim.Server
	SimURL      string
	BaseURL     string
	APIKey      string
	DatabaseURL string
	NATSURL     string
	Postgres    *Postgres
	NATS        *NATS
	NATSDir     string
	simServer   *http.Server
}

// DevTenant is the tenant levee dev's key belongs to.
const DevTenant = "dev"

// StartStack starts Postgres (unless DatabaseURL is set), NATS (unless
// NATSURL is set), the simulator, migrations and the gateway.
func StartStack(ctx context.Context, o StackOptions) (_ *Stack, err error) {
	if o.File == nil {
		o.File = DefaultFile()
	}
	if o.Listen == "" {
		o.Listen = config.DefaultListen
	}
	s := &Stack{DatabaseURL: o.DatabaseURL, NATSURL: o.NATSURL}
	defer func() {
		if err != nil {
			s.Stop(context.Background())
		}
	}()
	if err := os.MkdirAll(o.DataDir, 0o755); err != nil {
		return nil, fmt.Errorf("dev: %w", err)
	}
	if s.DatabaseURL == "" {
		if s.Postgres, err = StartPostgres(ctx, filepath.Join(o.DataDir, "pg"), PostgresOptions{Ephemeral: o.Ephemeral}); err != nil {
			return nil, err
		}
		s.DatabaseURL = s.Postgres.URL
	}
	if s.NATSURL == "" {
		s.NATSDir = filepath.Join(o.DataDir, "nats")
		if s.NATS, err = StartNATS(s.NATSDir, 0); err != nil {
			return nil, err
		}
		s.NATSURL = s.NATS.URL
	}

	simKey := store.NewSecret()
	var simCfg sim.Config
	simCfg.APIKey = simKey
	for _, d := range o.File.Deployments {
		sd := d.Sim
		sd.Name, sd.Model, sd.Kind, sd.Region = d.Name, d.Model, string(d.Kind), d.Region
		if sd.TPM == 0 {
			sd.TPM = d.TPM
		}
		if sd.RPM == 0 {
			sd.RPM = d.RPM
		}
		simCfg.Deployments = append(simCfg.Deployments, sd)
	}
	if s.Sim, err = sim.New(simCfg); err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("dev: simulator: %w", err)
	}
	s.SimURL = "http://" + ln.Addr().String()
	s.simServer = &http.Server{Handler: s.Sim, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = s.simServer.Serve(ln) }()

	cfg := &config.Config{Listen: o.Listen, DatabaseURL: s.DatabaseURL, NATSURL: s.NATSURL, NATSCreds: o.NATSCreds, NATSTLS: o.NATSTLS,
		Models: o.File.Models, Circuit: o.File.Circuit, Usage: o.File.Usage, Queue: o.File.Queue, Worker: o.File.Worker, Retention: o.File.Retention,
		HTTP: o.File.HTTP, Auth: o.File.Auth, Pricing: o.File.Pricing, DatabaseMaxConns: o.File.DatabaseMaxConns, DatabaseTimeout: o.File.DatabaseTimeout, ShutdownTimeout: 10 * time.Second}
	cfg.Auth.AdminKey = o.AdminKey
	if cfg.Auth.AdminKey == "" {
		cfg.Auth.AdminKey = store.NewAdminSecret()
	}
	cfg.Webhooks = o.File.Webhooks
	cfg.Webhooks.AllowLoopback = true // so a receiver on this machine works
	for _, d := range o.File.Deployments {
		cfg.Deployments = append(cfg.Deployments, config.Deployment{
			Name: d.Name, Model: d.Model, Kind: d.Kind, TPM: d.TPM, RPM: d.RPM, Region: d.Region,
			Priority: d.Priority, Weight: d.Weight, Timeout: d.Timeout, SyncReserve: d.SyncReserve, API: config.Azure,
			// Each deployment is a resource of its own, as on Azure: its
			// stored responses are its own.
			Endpoint: s.SimURL + "/resources/" + d.Name, Credential: simKey,
		})
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	s.Config = cfg

	if s.Store, err = store.Open(ctx, s.DatabaseURL, cfg.DatabaseMaxConns); err != nil {
		return nil, err
	}
	if err := s.Store.Migrate(ctx); err != nil {
		return nil, err
	}
	if s.APIKey, err = devKey(ctx, s.Store, o.DataDir, o.APIKey); err != nil {
		return nil, err
	}
	log := o.Log
	if log == nil {
		log = slog.Default()
	}
	if s.Gateway, err = gateway.Start(ctx, cfg, s.Store, gateway.Roles{API: true, Workers: !o.NoWorkers, Tracer: o.Tracer}, log); err != nil {
		return nil, err
	}
	s.BaseURL = "http://" + s.Gateway.Addr
	return s, nil
}

// devKey returns a key of the dev tenant: the fixed one if given, else the
// one kept in the data directory from an earlier run, else a new one.
func devKey(ctx context.Context, st *store.Store, dataDir, fixed string) (string, error) {
	if _, err := st.CreateTenant(ctx, &store.CreateTenantParams{Name: DevTenant}); err != nil && !errors.Is(err, store.ErrExists) {
		return "", err
	}
	keyFile := filepath.Join(dataDir, "dev-api-key")
	secret := fixed
	if secret == "" {
		if b, err := os.ReadFile(keyFile); err == nil {
			secret = strings.TrimSpace(string(b))
		}
	}
	if secret != "" {
		if _, err := st.KeyBySecret(ctx, secret); err == nil {
			return secret, nil
		}
	}
	_, secret, err := st.CreateKey(ctx, &store.CreateKeyParams{TenantName: DevTenant, Name: "levee dev", Secret: secret})
	if err != nil {
		return "", err
	}
	if fixed == "" {
		if err := os.WriteFile(keyFile, []byte(secret+"\n"), 0o600); err != nil {
			return "", fmt.Errorf("dev: %w", err)
		}
	}
	return secret, nil
}

// Stop stops everything it started, gateway first so usage is flushed.
func (s *Stack) Stop(ctx context.Context) error {
	var errs []error
	if s.Gateway != nil {
		errs = append(errs, s.Gateway.Shutdown(ctx))
	}
	if s.simServer != nil {
		_ = s.simServer.Close()
	}
	if s.Store != nil {
		s.Store.Close()
	}
	if s.NATS != nil {
		s.NATS.Stop()
	}
	if s.Postgres != nil {
		errs = append(errs, s.Postgres.Stop())
	}
	return errors.Join(errs...)
}

// StartEphemeral runs a throwaway stack for a benchmark: its own temporary
// data directory (reachable by the postgres user), Postgres without fsync, a
// free port, logs discarded. stop shuts it down and removes the directory.
func StartEphemeral(ctx context.Context, f *File) (s *Stack, stop func(), err error) {
	dir, err := os.MkdirTemp("", "levee-bench-")
	if err != nil {
		return nil, nil, err
	}
	_ = os.Chmod(dir, 0o755)
	s, err = StartStack(ctx, StackOptions{Listen: "127.0.0.1:0", DataDir: dir, File: f, Ephemeral: true,
		Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		os.RemoveAll(dir)
		return nil, nil, err
	}
	return s, func() {
		_ = s.Stop(context.Background())
		os.RemoveAll(dir)
	}, nil
}
