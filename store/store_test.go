package store_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/store"
)

// migrated starts a private cluster and returns a migrated store on it.
func migrated(t testing.TB) (*dev.Postgres, *store.Store, string) {
	t.Helper()
	if testing.Short() {
		t.Skip("needs Postgres")
	}
	dir, _ := os.MkdirTemp("", "levee-store-")
	t.Cleanup(func() { os.RemoveAll(dir) })
	pg := startCluster(t, dir+"/pg", 0)
	t.Cleanup(func() { pg.Stop() })
	st, err := store.Open(context.Background(), pg.URL, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(st.Close)
	if err := st.Migrate(context.Background()); err != nil {
		t.Fatal(err)
	}
	return pg, st, dir
}

func startCluster(t testing.TB, dir string, port int) *dev.Postgres {
	t.Helper()
	pg, err := dev.StartPostgres(context.Background(), dir, dev.PostgresOptions{Ephemeral: true, Port: port})
	if err != nil {
		t.Fatal(err)
	}
	return pg
}

func TestKeysAreHashedAndTenantScoped(t *testing.T) {
	_, st, _ := migrated(t)
	ctx := context.Background()
	if err := st.Migrate(ctx); err != nil {
		t.Fatalf("migrating twice: %v", err)
	}
	if _, err := st.CreateTenant(ctx, &store.CreateTenantParams{Name: "acme"}); err != nil {
		t.Fatal(err)
	}
	if _, err := st.CreateTenant(ctx, &store.CreateTenantParams{Name: "acme"}); !errors.Is(err, store.ErrExists) {
		t.Fatalf("duplicate tenant: %v", err)
	}
	if _, _, err := st.CreateKey(ctx, &store.CreateKeyParams{TenantName: "nobody"}); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("key for unknown tenant: %v", err)
	}
	k, secret, err := st.CreateKey(ctx, &store.CreateKeyParams{TenantName: "acme", Name: "ci"})
	if err != nil {
		t.Fatal(err)
	}
	var stored []byte
	if err := st.Pool().QueryRow(ctx, `SELECT hash FROM api_keys WHERE id = $1`, k.ID).Scan(&stored); err != nil {
		t.Fatal(err)
	}
	if len(stored) != 32 || string(stored) == secret {
		t.Fatal("the key is not stored as a SHA-256 hash")
	}
	got, err := st.KeyBySecret(ctx, secret)
	if err != nil || got.TenantName != "acme" || got.ID != k.ID {
		t.Fatalf("lookup: %+v %v", got, err)
	}
	if _, err := st.KeyBySecret(ctx, secret+"x"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("a wrong key authenticated: %v", err)
	}
}

func TestLedgerSurvivesAPostgresRestart(t *testing.T) {
	pg, st, dir := migrated(t)
	port := pg.Port
	ctx := context.Background()
	tenant, _ := st.CreateTenant(ctx, &store.CreateTenantParams{Name: "acme"})
	l := st.NewLedger(store.LedgerConfig{FlushInterval: 20 * time.Millisecond, BatchSize: 50, BufferSize: 16, MaxPending: 10_000},
		slog.New(slog.NewTextHandler(io.Discard, nil)))
	record := func(n int) {
		for i := 0; i < n; i++ {
			l.Record(store.UsageEvent{At: time.Now(), RequestID: uuid.NewString(), TenantID: tenant.ID, Deployment: "d", Model: "m",
				Operation: "chat/completions", Status: 200, PromptTokens: 3, CompletionTokens: 4, Priority: "high"})
			time.Sleep(100 * time.Microsecond) // a steady trickle, as from traffic
		}
	}
	record(100)
	if err := pg.Stop(); err != nil {
		t.Fatal(err)
	}
	record(300) // Postgres is down: these wait in memory
	pg = startCluster(t, dir+"/pg", port)
	record(100)
	fctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := l.Close(fctx); err != nil {
		t.Fatal(err)
	}
	var rows, tokens int64
	if err := st.Pool().QueryRow(ctx, `SELECT count(*), coalesce(sum(prompt_tokens + completion_tokens), 0) FROM usage_events`).Scan(&rows, &tokens); err != nil {
		t.Fatal(err)
	}
	var rolled int64
	_ = st.Pool().QueryRow(ctx, `SELECT coalesce(sum(requests), 0) FROM usage_daily`).Scan(&rolled)
	if rows != 500 || tokens != 500*7 || rolled != 500 || l.Dropped() != 0 {
		t.Fatalf("after a restart: %d rows, %d tokens, %d rolled up, %d dropped; want 500/3500/500/0", rows, tokens, rolled, l.Dropped())
	}
}

// Processes starting together on a new database (a fresh install of
// several gateways) each migrate it; they take turns, and every one starts.
func TestConcurrentMigrationsTakeTurns(t *testing.T) {
	if testing.Short() {
		t.Skip("needs Postgres")
	}
	dir := t.TempDir()
	pg := startCluster(t, dir+"/pg", 0)
	t.Cleanup(func() { pg.Stop() })
	errs := make(chan error, 8)
	for i := 0; i < 8; i++ {
		go func() {
			st, err := store.Open(context.Background(), pg.URL, 0)
			if err != nil {
				errs <- err
				return
			}
			defer st.Close()
			errs <- st.Migrate(context.Background())
		}()
	}
	for i := 0; i < 8; i++ {
		if err := <-errs; err != nil {
			t.Errorf("migrating alongside others: %v", err)
		}
	}
}
