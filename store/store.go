// Package store owns Levee's Postgres state: the schema (applied from
// migrations/ with goose), tenants and their API keys, and the usage ledger
// with its daily rollup. Methods take a context first and return typed errors
// (ErrNotFound, ErrExists) where callers branch on them.
package store

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/pressly/goose/v3"

	"github.com/levee-gw/levee/migrations"
)

var (
	// ErrNotFound is returned when a looked-up row does not exist.
	ErrNotFound = errors.New("not found")
	// ErrExists is returned when a row with the same unique name exists.
	ErrExists = errors.New("already exists")
)

// Store is a pool of connections to Levee's database.
type Store struct {
	pool *pgxpool.Pool

	markOnce sync.Once
	marks    chan uuid.UUID
	markDone chan struct{}
}

// Open connects to url with a pool of at most maxConns connections (0: the
// URL's pool_max_conns, else pgx's default); it does not migrate.
func Open(ctx context.Context, url string, maxConns int) (*Store, error) {
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, fmt.Errorf("store: parse database url: %w", err)
	}
	if maxConns > 0 {
		cfg.MaxConns = int32(maxConns)
	}
	// A server that does not answer a connection attempt must not hold
	// the caller longer than this (callers bound their queries too).
	if cfg.ConnConfig.ConnectTimeout == 0 || cfg.ConnConfig.ConnectTimeout > 5*time.Second {
		cfg.ConnConfig.ConnectTimeout = 5 * time.Second
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	return &Store{pool: pool}, nil
}

// Close writes pending publish marks and closes the pool.
func (s *Store) Close() {
	if s.marks != nil {
		close(s.marks)
		<-s.markDone
	}
	s.pool.Close()
}

// MarkPublishedSoon records, within a few tens of milliseconds and batched
// with others, that a job's message reached JetStream. Only the sweeper
// reads the mark, and it waits far longer than that.
func (s *Store) MarkPublishedSoon(id uuid.UUID) {
	s.markOnce.Do(func() {
		s.marks, s.markDone = make(chan uuid.UUID, 4096), make(chan struct{})
		go s.markLoop()
	})
	s.marks <- id
}

func (s *Store) markLoop() {
	defer close(s.markDone)
	var ids []uuid.UUID
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	flush := func() {
		if len(ids) == 0 {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_ = s.MarkPublished(ctx, ids...) // a lost mark only means a harmless republish
		cancel()
		ids = ids[:0]
	}
	for {
		select {
		case id, ok := <-s.marks:
			if !ok {
				flush()
				return
			}
			ids = append(ids, id)
			if len(ids) >= 1000 {
				flush()
			}
		case <-t.C:
			flush()
		}
	}
}

// Pool exposes the pool to code in this module that needs raw access (tests).
func (s *Store) Pool() *pgxpool.Pool { return s.pool }

// Ping checks that Postgres answers.
func (s *Store) Ping(ctx context.Context) error { return s.pool.Ping(ctx) }

// Migrate applies every pending migration. Goose takes a session-level
// advisory lock, so several processes starting at once are safe.
func (s *Store) Migrate(ctx context.Context) error {
	db := stdlib.OpenDBFromPool(s.pool)
	defer db.Close()
	p, err := goose.NewProvider(goose.DialectPostgres, db, migrations.FS)
	if err != nil {
		return fmt.Errorf("store: migrations: %w", err)
	}
	if _, err := p.Up(ctx); err != nil {
		return fmt.Errorf("store: migrate: %w", err)
	}
	return s.MaintainPartitions(ctx, time.Now())
}

func isDuplicate(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && (pe.Code == "23505" || pe.Code == "42P07")
}

// Tenant is a customer of the gateway; usage is charged to it.
type Tenant struct {
	ID              uuid.UUID
	Name            string
	DefaultPriority string
	CreatedAt       time.Time
}

// CreateTenantParams are the fields of a new tenant.
type CreateTenantParams struct {
	Name string
}

// CreateTenant inserts a tenant; ErrExists if the name is taken.
func (s *Store) CreateTenant(ctx context.Context, p *CreateTenantParams) (*Tenant, error) {
	if p.Name == "" {
		return nil, errors.New("store: tenant name is required")
	}
	t := &Tenant{ID: uuid.New(), Name: p.Name}
	err := s.pool.QueryRow(ctx,
		`INSERT INTO tenants (id, name) VALUES ($1, $2) RETURNING default_priority, created_at`,
		t.ID, t.Name).Scan(&t.DefaultPriority, &t.CreatedAt)
	if isDuplicate(err) {
		return nil, fmt.Errorf("store: tenant %q: %w", p.Name, ErrExists)
	}
	if err != nil {
		return nil, fmt.Errorf("store: create tenant: %w", err)
	}
	return t, nil
}

// TenantByName finds a tenant; ErrNotFound if there is none.
func (s *Store) TenantByName(ctx context.Context, name string) (*Tenant, error) {
	t := &Tenant{}
	err := s.pool.QueryRow(ctx, `SELECT id, name, default_priority, created_at FROM tenants WHERE name = $1`, name).
		Scan(&t.ID, &t.Name, &t.DefaultPriority, &t.CreatedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fmt.Errorf("store: tenant %q: %w", name, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("store: tenant: %w", err)
	}
	return t, nil
}

// TenantName is a tenant's name, by id.
func (s *Store) TenantName(ctx context.Context, id uuid.UUID) (string, error) {
	var name string
	err := s.pool.QueryRow(ctx, `SELECT name FROM tenants WHERE id = $1`, id).Scan(&name)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", fmt.Errorf("store: tenant %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return "", fmt.Errorf("store: tenant: %w", err)
	}
	return name, nil
}

// Key is an API key's record; the secret itself is never stored.
type Key struct {
	ID              uuid.UUID
	TenantID        uuid.UUID
	TenantName      string
	Prefix          string
	Name            string
	DefaultPriority string
	CreatedAt       time.Time
}

// CreateKeyParams are the fields of a new key. Secret may be set to import a
// known key (levee dev's LEVEE_DEV_API_KEY); otherwise one is generated.
type CreateKeyParams struct {
	TenantName string
	Name       string
	Secret     string
}

// KeyPrefix starts every generated key, so a leaked one is easy to grep for.
const KeyPrefix = "lv-"

// NewSecret returns a fresh key: the prefix and 256 random bits.
func NewSecret() string {
	var b [32]byte
	_, _ = rand.Read(b[:])
	return KeyPrefix + base64.RawURLEncoding.EncodeToString(b[:])
}

func hashSecret(secret string) []byte {
	h := sha256.Sum256([]byte(secret))
	return h[:]
}

// CreateKey stores a key for a tenant and returns it with its secret, which
// is shown this once.
func (s *Store) CreateKey(ctx context.Context, p *CreateKeyParams) (*Key, string, error) {
	t, err := s.TenantByName(ctx, p.TenantName)
	if err != nil {
		return nil, "", err
	}
	secret := p.Secret
	if secret == "" {
		secret = NewSecret()
	}
	if len(secret) < 16 {
		return nil, "", errors.New("store: a key must be at least 16 characters")
	}
	k := &Key{ID: uuid.New(), TenantID: t.ID, TenantName: t.Name, Prefix: secret[:min(len(secret), 8)], Name: p.Name, DefaultPriority: t.DefaultPriority}
	err = s.pool.QueryRow(ctx,
		`INSERT INTO api_keys (id, tenant_id, hash, prefix, name) VALUES ($1, $2, $3, $4, $5) RETURNING created_at`,
		k.ID, k.TenantID, hashSecret(secret), k.Prefix, k.Name).Scan(&k.CreatedAt)
	if isDuplicate(err) {
		return nil, "", fmt.Errorf("store: key: %w", ErrExists)
	}
	if err != nil {
		return nil, "", fmt.Errorf("store: create key: %w", err)
	}
	return k, secret, nil
}

// KeyBySecret authenticates a presented secret. The lookup is by hash, and the
// stored hash is compared with the presented one in constant time.
func (s *Store) KeyBySecret(ctx context.Context, secret string) (*Key, error) {
	h := hashSecret(secret)
	var stored []byte
	k := &Key{}
	var keyPrio *string
	err := s.pool.QueryRow(ctx, `
		SELECT k.id, k.tenant_id, t.name, k.prefix, k.name, k.default_priority, t.default_priority, k.created_at, k.hash
		FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
		WHERE k.hash = $1 AND k.revoked_at IS NULL`, h).
		Scan(&k.ID, &k.TenantID, &k.TenantName, &k.Prefix, &k.Name, &keyPrio, &k.DefaultPriority, &k.CreatedAt, &stored)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("store: key lookup: %w", err)
	}
	if subtle.ConstantTimeCompare(stored, h) != 1 {
		return nil, ErrNotFound
	}
	if keyPrio != nil {
		k.DefaultPriority = *keyPrio
	}
	return k, nil
}
