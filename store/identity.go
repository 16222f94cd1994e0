package store

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

var (
	// ErrKeyExpired is a key that exists but whose expires_at has passed.
	ErrKeyExpired = errors.New("key expired")
	// ErrHasWork refuses deleting a tenant with queued or running work.
	ErrHasWork = errors.New("the tenant has queued or running work")
)

// Tenant is a customer of the gateway; usage is charged to it.
type Tenant struct {
	ID              uuid.UUID
	Name            string
	DefaultPriority string
	CreatedAt       time.Time
}

// Scopes restrict what a key (or a token) may do; an empty field is no
// restriction.
type Scopes struct {
	// Models are aliases (a call naming one of their deployments is a call
	// to the alias).
	Models []string
	// Endpoints are groups: chat, completions, embeddings, responses,
	// jobs, batches, files, usage, webhooks.
	Endpoints []string
	// MaxPriority is the highest priority it may ask for: high, normal
	// or low.
	MaxPriority string
	// CIDRs are the client addresses it may be used from.
	CIDRs []netip.Prefix
}

// Key is an API key's record; the secret itself is never stored.
type Key struct {
	ID              uuid.UUID
	TenantID        uuid.UUID
	TenantName      string
	Prefix          string
	Name            string
	DefaultPriority string
	Scopes          Scopes
	CreatedAt       time.Time
	// ExpiresAt, LastUsedAt and RevokedAt are zero when not set.
	ExpiresAt  time.Time
	LastUsedAt time.Time
	RevokedAt  time.Time
	// PreviousExpiresAt is when the secret it had before its last rotation
	// stops working (zero: none is valid).
	PreviousExpiresAt time.Time
	// ValidUntil, set by KeyBySecret, is when the presented secret stops
	// being valid (its expiry, or the end of a rotation's grace); zero:
	// until revoked.
	ValidUntil time.Time
	// Token is a caller authenticated by a JWT: its ID is derived from
	// the token's issuer and subject, not a stored key's.
	Token bool
	// Grants, for a token caller, are the alternatives its scopes came
	// from (Scopes is their union): a call must fit one of them whole.
	// Nil for API keys.
	Grants []Scopes
	// keyPriority is the key's own default priority ("" = the tenant's).
	keyPriority string
}

// KeyPriority is the key's own default priority ("": its tenant's).
func (k *Key) KeyPriority() string { return k.keyPriority }

// tenantNameRE: a tenant's name appears in metrics, usage, the audit log
// and paths: plain characters only.
var tenantNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// InvalidNameError is a tenant name that cannot be used.
type InvalidNameError struct{ Msg string }

func (e *InvalidNameError) Error() string { return e.Msg }

// CheckTenantName refuses names that are not plain, and names shaped like a
// tenant id: where an id or a name is taken, such a name could designate
// another tenant.
func CheckTenantName(name string) error {
	if !tenantNameRE.MatchString(name) {
		return &InvalidNameError{"name must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit."}
	}
	if _, err := uuid.Parse(name); err == nil {
		return &InvalidNameError{"name must not have the shape of a tenant id (a UUID)."}
	}
	return nil
}

// Prefixes start generated secrets, so a leaked one is easy to grep for and
// a key's kind is plain from its shape.
const (
	KeyPrefix      = "lv-"
	AdminKeyPrefix = "lva-"
)

// NewSecret returns a fresh key: the prefix and 256 random bits.
func NewSecret() string { return newSecret(KeyPrefix) }

// NewAdminSecret returns a fresh admin key, as for LEVEE_ADMIN_KEY.
func NewAdminSecret() string { return newSecret(AdminKeyPrefix) }

func newSecret(prefix string) string {
	var b [32]byte
	_, _ = rand.Read(b[:])
	return prefix + base64.RawURLEncoding.EncodeToString(b[:])
}

func hashSecret(secret string) []byte {
	h := sha256.Sum256([]byte(secret))
	return h[:]
}

// audit records an administrative change inside the transaction that makes
// it, so the log has a row exactly when the change happened. before and
// after are JSON (nil: none).
func audit(ctx context.Context, tx pgx.Tx, actor, action, targetType, targetID string, tenant uuid.UUID, before, after json.RawMessage) error {
	if actor == "" {
		return errors.New("store: an administrative change needs an actor")
	}
	id, _ := uuid.NewV7()
	var t any
	if tenant != uuid.Nil {
		t = tenant
	}
	_, err := tx.Exec(ctx, `INSERT INTO audit_log (id, actor, action, target_type, target_id, tenant_id, before, after)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8)`, id, actor, action, targetType, targetID, t, nullJSON(before), nullJSON(after))
	if err != nil {
		return fmt.Errorf("store: audit: %w", err)
	}
	return nil
}

func nullJSON(j json.RawMessage) any {
	if len(j) == 0 {
		return nil
	}
	return []byte(j)
}

// rowJSON renders the row query selects as JSON (nil when there is none),
// for the audit log's before and after.
func rowJSON(ctx context.Context, tx pgx.Tx, query string, args ...any) (json.RawMessage, error) {
	var j []byte
	err := tx.QueryRow(ctx, `SELECT to_jsonb(r) FROM (`+query+`) r`, args...).Scan(&j)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, nil
	}
	return j, err
}

// What the audit log shows of a key: everything but its hashes.
const keyAuditColumns = `SELECT id, tenant_id, prefix, name, default_priority, models, endpoints, max_priority, cidrs, expires_at,
	previous_expires_at, revoked_at FROM api_keys WHERE id = $1`

const tenantAuditColumns = `SELECT id, name, default_priority, deleted_at FROM tenants WHERE id = $1`

// keyEvent tells every process to forget what it cached of a key (or of
// all a tenant's keys).
func keyEvent(ctx context.Context, tx pgx.Tx, key, tenant uuid.UUID) error {
	var k, t any
	if key != uuid.Nil {
		k = key
	}
	if tenant != uuid.Nil {
		t = tenant
	}
	_, err := tx.Exec(ctx, `INSERT INTO key_events (key_id, tenant_id) VALUES ($1, $2)`, k, t)
	return err
}

// CreateTenantParams are the fields of a new tenant.
type CreateTenantParams struct {
	Name string
	// DefaultPriority of its calls: high (the default), normal or low.
	DefaultPriority string
	Actor           string
}

// CreateTenant inserts a tenant; ErrExists if the name is taken (by a
// deleted tenant too: its usage still carries the name).
func (s *Store) CreateTenant(ctx context.Context, p *CreateTenantParams) (*Tenant, error) {
	if err := CheckTenantName(p.Name); err != nil {
		return nil, err
	}
	prio := p.DefaultPriority
	if prio == "" {
		prio = "high"
	}
	t := &Tenant{ID: uuid.New(), Name: p.Name}
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		err := tx.QueryRow(ctx, `INSERT INTO tenants (id, name, default_priority) VALUES ($1, $2, $3) RETURNING default_priority, created_at`,
			t.ID, t.Name, prio).Scan(&t.DefaultPriority, &t.CreatedAt)
		if err != nil {
			return err
		}
		after, err := rowJSON(ctx, tx, tenantAuditColumns, t.ID)
		if err != nil {
			return err
		}
		return audit(ctx, tx, actorOr(p.Actor), "tenant.create", "tenant", t.ID.String(), t.ID, nil, after)
	})
	if isDuplicate(err) {
		return nil, fmt.Errorf("store: tenant %q: %w", p.Name, ErrExists)
	}
	if err != nil {
		return nil, fmt.Errorf("store: create tenant: %w", err)
	}
	return t, nil
}

// actorOr names changes made without one (levee dev's bootstrap, tests).
func actorOr(a string) string {
	if a == "" {
		return "system"
	}
	return a
}

const tenantColumns = `id, name, default_priority, created_at`

func scanTenant(row pgx.Row) (*Tenant, error) {
	t := &Tenant{}
	err := row.Scan(&t.ID, &t.Name, &t.DefaultPriority, &t.CreatedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, ErrNotFound
	}
	return t, err
}

// TenantByName finds a tenant that is not deleted; ErrNotFound if there is
// none.
func (s *Store) TenantByName(ctx context.Context, name string) (*Tenant, error) {
	t, err := scanTenant(s.pool.QueryRow(ctx, `SELECT `+tenantColumns+` FROM tenants WHERE name = $1 AND deleted_at IS NULL`, name))
	if err != nil {
		return nil, fmt.Errorf("store: tenant %q: %w", name, err)
	}
	return t, nil
}

// TenantByID finds a tenant that is not deleted.
func (s *Store) TenantByID(ctx context.Context, id uuid.UUID) (*Tenant, error) {
	t, err := scanTenant(s.pool.QueryRow(ctx, `SELECT `+tenantColumns+` FROM tenants WHERE id = $1 AND deleted_at IS NULL`, id))
	if err != nil {
		return nil, fmt.Errorf("store: tenant %s: %w", id, err)
	}
	return t, nil
}

// TenantName is a tenant's name, by id (a deleted one's too: it names
// its usage).
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

// ListTenants pages the tenants that are not deleted by name: those after
// the name after, at most limit.
func (s *Store) ListTenants(ctx context.Context, after string, limit int) ([]Tenant, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+tenantColumns+` FROM tenants WHERE deleted_at IS NULL AND name > $1 ORDER BY name LIMIT $2`, after, limit)
	if err != nil {
		return nil, fmt.Errorf("store: list tenants: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (Tenant, error) {
		t, err := scanTenant(r)
		if err != nil {
			return Tenant{}, err
		}
		return *t, nil
	})
}

// UpdateTenantParams change a tenant; a nil field is left as it is.
type UpdateTenantParams struct {
	ID              uuid.UUID
	DefaultPriority *string
	Actor           string
}

// UpdateTenant changes a tenant and logs it.
func (s *Store) UpdateTenant(ctx context.Context, p *UpdateTenantParams) (*Tenant, error) {
	var t *Tenant
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		before, err := rowJSON(ctx, tx, tenantAuditColumns+` AND deleted_at IS NULL FOR UPDATE`, p.ID)
		if err != nil {
			return err
		}
		if before == nil {
			return ErrNotFound
		}
		if t, err = scanTenant(tx.QueryRow(ctx, `UPDATE tenants SET default_priority = coalesce($2, default_priority) WHERE id = $1
			RETURNING `+tenantColumns, p.ID, p.DefaultPriority)); err != nil {
			return err
		}
		after, err := rowJSON(ctx, tx, tenantAuditColumns, p.ID)
		if err != nil {
			return err
		}
		if err := keyEvent(ctx, tx, uuid.Nil, p.ID); err != nil { // keys carry the tenant's default priority
			return err
		}
		return audit(ctx, tx, actorOr(p.Actor), "tenant.update", "tenant", p.ID.String(), p.ID, before, after)
	})
	if err != nil {
		return nil, fmt.Errorf("store: update tenant: %w", err)
	}
	return t, nil
}

// DeleteTenant deletes a tenant: its keys stop working on every process
// within seconds, and its row stays (its name still names its usage). With
// queued or running jobs, or batches under way, it is refused (ErrHasWork)
// unless force, which cancels them.
func (s *Store) DeleteTenant(ctx context.Context, id uuid.UUID, force bool, actor string) error {
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		before, err := rowJSON(ctx, tx, tenantAuditColumns+` AND deleted_at IS NULL FOR UPDATE`, id)
		if err != nil {
			return err
		}
		if before == nil {
			return ErrNotFound
		}
		var jobs, batches int64
		if err := tx.QueryRow(ctx, `SELECT (SELECT count(*) FROM jobs WHERE tenant_id = $1 AND status IN ('queued', 'running')),
			(SELECT count(*) FROM batches WHERE tenant_id = $1 AND status IN ('validating', 'in_progress', 'finalizing', 'cancelling'))`, id).
			Scan(&jobs, &batches); err != nil {
			return err
		}
		if (jobs > 0 || batches > 0) && !force {
			return fmt.Errorf("%w: %d jobs, %d batches", ErrHasWork, jobs, batches)
		}
		if _, err := tx.Exec(ctx, `UPDATE jobs SET status = 'cancelled', finished_at = now(), lease_until = NULL,
			error_code = 'tenant_deleted', error_message = 'the tenant was deleted'
			WHERE tenant_id = $1 AND status IN ('queued', 'running')`, id); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `UPDATE batches SET status = 'cancelled', cancelled_at = now()
			WHERE tenant_id = $1 AND status IN ('validating', 'in_progress', 'finalizing', 'cancelling')`, id); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `UPDATE api_keys SET revoked_at = now() WHERE tenant_id = $1 AND revoked_at IS NULL`, id); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `UPDATE tenants SET deleted_at = now() WHERE id = $1`, id); err != nil {
			return err
		}
		if err := bumpSettings(ctx, tx); err != nil { // its limits and budgets go from every process
			return err
		}
		if err := keyEvent(ctx, tx, uuid.Nil, id); err != nil {
			return err
		}
		after, err := rowJSON(ctx, tx, tenantAuditColumns, id)
		if err != nil {
			return err
		}
		return audit(ctx, tx, actorOr(actor), "tenant.delete", "tenant", id.String(), id, before, after)
	})
	if err != nil {
		return fmt.Errorf("store: delete tenant: %w", err)
	}
	return nil
}

// CreateKeyParams are the fields of a new key. Secret may be set to import a
// known key (levee dev's LEVEE_DEV_API_KEY); otherwise one is generated.
// The tenant is TenantID, or by name TenantName.
type CreateKeyParams struct {
	TenantID        uuid.UUID
	TenantName      string
	Name            string
	Secret          string
	DefaultPriority string
	Scopes          Scopes
	ExpiresAt       time.Time
	Actor           string
}

// CreateKey stores a key for a tenant and returns it with its secret, which
// is shown this once.
func (s *Store) CreateKey(ctx context.Context, p *CreateKeyParams) (*Key, string, error) {
	var t *Tenant
	var err error
	if p.TenantID != uuid.Nil {
		t, err = s.TenantByID(ctx, p.TenantID)
	} else {
		t, err = s.TenantByName(ctx, p.TenantName)
	}
	if err != nil {
		return nil, "", err
	}
	secret := p.Secret
	if secret == "" {
		secret = NewSecret()
	}
	if len(secret) < 16 || strings.HasPrefix(secret, AdminKeyPrefix) {
		return nil, "", errors.New("store: a key must be at least 16 characters, and not shaped as an admin key")
	}
	id, _ := uuid.NewV7()
	err = pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		models, endpoints, prio, cidrs := scopeArgs(p.Scopes)
		if _, err := tx.Exec(ctx, `INSERT INTO api_keys (id, tenant_id, hash, prefix, name, default_priority, models, endpoints, max_priority, cidrs, expires_at)
			VALUES ($1, $2, $3, $4, $5, nullif($6, ''), $7, $8, $9, $10, $11)`,
			id, t.ID, hashSecret(secret), secret[:min(len(secret), 8)], p.Name, p.DefaultPriority, models, endpoints, prio, cidrs, nullTime(p.ExpiresAt)); err != nil {
			return err
		}
		after, err := rowJSON(ctx, tx, keyAuditColumns, id)
		if err != nil {
			return err
		}
		return audit(ctx, tx, actorOr(p.Actor), "key.create", "key", id.String(), t.ID, nil, after)
	})
	if isDuplicate(err) {
		return nil, "", fmt.Errorf("store: key: %w", ErrExists)
	}
	if err != nil {
		return nil, "", fmt.Errorf("store: create key: %w", err)
	}
	k, err := s.KeyByID(ctx, id)
	return k, secret, err
}

// scopeArgs are Scopes as column values (NULL: no restriction).
func scopeArgs(sc Scopes) (models, endpoints, prio, cidrs any) {
	if sc.Models != nil {
		models = sc.Models
	}
	if sc.Endpoints != nil {
		endpoints = sc.Endpoints
	}
	if sc.MaxPriority != "" {
		prio = sc.MaxPriority
	}
	if sc.CIDRs != nil {
		cs := make([]string, len(sc.CIDRs))
		for i, c := range sc.CIDRs {
			cs[i] = c.String()
		}
		cidrs = cs
	}
	return
}

func nullTime(t time.Time) any {
	if t.IsZero() {
		return nil
	}
	return t
}

const keyColumns = `k.id, k.tenant_id, t.name, k.prefix, k.name, k.default_priority, t.default_priority, k.created_at,
	k.models, k.endpoints, k.max_priority, k.cidrs, k.expires_at, k.last_used_at, k.revoked_at, k.previous_expires_at`

type keyRow struct {
	k                      Key
	keyPrio, maxPrio       *string
	cidrs                  []string
	expires, used, revoked *time.Time
	previousExpires        *time.Time
	hash, previousHash     []byte
}

func (r *keyRow) dest() []any {
	k := &r.k
	return []any{&k.ID, &k.TenantID, &k.TenantName, &k.Prefix, &k.Name, &r.keyPrio, &k.DefaultPriority, &k.CreatedAt,
		&k.Scopes.Models, &k.Scopes.Endpoints, &r.maxPrio, &r.cidrs, &r.expires, &r.used, &r.revoked, &r.previousExpires}
}

func (r *keyRow) key() (*Key, error) {
	k := r.k
	if r.keyPrio != nil {
		k.keyPriority = *r.keyPrio
		k.DefaultPriority = *r.keyPrio
	}
	if r.maxPrio != nil {
		k.Scopes.MaxPriority = *r.maxPrio
		// A call that asks for nothing gets the highest it may have.
		if priorityRank(k.DefaultPriority) < priorityRank(k.Scopes.MaxPriority) {
			k.DefaultPriority = k.Scopes.MaxPriority
		}
	}
	if r.cidrs != nil {
		k.Scopes.CIDRs = make([]netip.Prefix, 0, len(r.cidrs))
		for _, c := range r.cidrs {
			p, err := netip.ParsePrefix(c)
			if err != nil {
				return nil, fmt.Errorf("store: key %s: stored cidr %q: %w", k.ID, c, err)
			}
			k.Scopes.CIDRs = append(k.Scopes.CIDRs, p)
		}
	}
	for _, t := range []struct {
		src *time.Time
		dst *time.Time
	}{{r.expires, &k.ExpiresAt}, {r.used, &k.LastUsedAt}, {r.revoked, &k.RevokedAt}, {r.previousExpires, &k.PreviousExpiresAt}} {
		if t.src != nil {
			*t.dst = *t.src
		}
	}
	return &k, nil
}

// priorityRank orders priorities, highest first (0).
func priorityRank(p string) int {
	return slices.Index([]string{"high", "normal", "low", "batch"}, p)
}

// KeyBySecret authenticates a presented secret: a key's current secret, or
// the one before its last rotation until the grace ends. The lookup is by
// hash, and the stored hash is compared with the presented one in constant
// time. ErrNotFound: no such valid key (or its tenant is deleted);
// ErrKeyExpired: it existed and has expired.
func (s *Store) KeyBySecret(ctx context.Context, secret string) (*Key, error) {
	h := hashSecret(secret)
	var r keyRow
	err := s.pool.QueryRow(ctx, `
		SELECT `+keyColumns+`, k.hash, k.previous_hash
		FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
		WHERE (k.hash = $1 OR (k.previous_hash = $1 AND k.previous_expires_at > now()))
		  AND k.revoked_at IS NULL AND t.deleted_at IS NULL`, h).
		Scan(append(r.dest(), &r.hash, &r.previousHash)...)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("store: key lookup: %w", err)
	}
	current := subtle.ConstantTimeCompare(r.hash, h) == 1
	if !current && subtle.ConstantTimeCompare(r.previousHash, h) != 1 {
		return nil, ErrNotFound
	}
	k, err := r.key()
	if err != nil {
		return nil, err
	}
	k.ValidUntil = k.ExpiresAt
	if !current && (k.ValidUntil.IsZero() || k.PreviousExpiresAt.Before(k.ValidUntil)) {
		k.ValidUntil = k.PreviousExpiresAt
	}
	if !k.ExpiresAt.IsZero() && !time.Now().Before(k.ExpiresAt) {
		return k, ErrKeyExpired
	}
	return k, nil
}

// KeyByID finds a key by id (revoked ones too), with its tenant.
func (s *Store) KeyByID(ctx context.Context, id uuid.UUID) (*Key, error) {
	var r keyRow
	err := s.pool.QueryRow(ctx, `SELECT `+keyColumns+` FROM api_keys k JOIN tenants t ON t.id = k.tenant_id WHERE k.id = $1`, id).Scan(r.dest()...)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fmt.Errorf("store: key %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("store: key: %w", err)
	}
	return r.key()
}

// ListKeys pages a tenant's keys (revoked ones too) in the order they were
// made: those after the key after (uuid.Nil: from the first), at most limit.
func (s *Store) ListKeys(ctx context.Context, tenant, after uuid.UUID, limit int) ([]Key, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+keyColumns+` FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
		WHERE k.tenant_id = $1 AND ($2::uuid IS NULL OR (k.created_at, k.id) > (SELECT created_at, id FROM api_keys WHERE id = $2))
		ORDER BY k.created_at, k.id LIMIT $3`, tenant, nullUUID(after), limit)
	if err != nil {
		return nil, fmt.Errorf("store: list keys: %w", err)
	}
	defer rows.Close()
	var out []Key
	for rows.Next() {
		var r keyRow
		if err := rows.Scan(r.dest()...); err != nil {
			return nil, fmt.Errorf("store: list keys: %w", err)
		}
		k, err := r.key()
		if err != nil {
			return nil, err
		}
		out = append(out, *k)
	}
	return out, rows.Err()
}

func nullUUID(id uuid.UUID) any {
	if id == uuid.Nil {
		return nil
	}
	return id
}

// UpdateKeyParams change a key; a nil field is left as it is. Scopes, when
// set, replace the key's scopes whole; a zero ExpiresAt removes the expiry.
type UpdateKeyParams struct {
	ID              uuid.UUID
	Name            *string
	DefaultPriority *string // "" restores the tenant's
	Scopes          *Scopes
	ExpiresAt       *time.Time
	Actor           string
}

// UpdateKey changes a key that is not revoked; every process forgets its
// cached copy within seconds.
func (s *Store) UpdateKey(ctx context.Context, p *UpdateKeyParams) (*Key, error) {
	err := s.changeKey(ctx, p.ID, p.Actor, "key.update", func(tx pgx.Tx) error {
		setScopes := p.Scopes != nil
		var sc Scopes
		if setScopes {
			sc = *p.Scopes
		}
		models, endpoints, prio, cidrs := scopeArgs(sc)
		var expires any
		if p.ExpiresAt != nil {
			expires = nullTime(*p.ExpiresAt)
		}
		_, err := tx.Exec(ctx, `UPDATE api_keys SET
				name = coalesce($2, name),
				default_priority = CASE WHEN $3::text IS NULL THEN default_priority ELSE nullif($3, '') END,
				models = CASE WHEN $4 THEN $5 ELSE models END,
				endpoints = CASE WHEN $4 THEN $6 ELSE endpoints END,
				max_priority = CASE WHEN $4 THEN $7 ELSE max_priority END,
				cidrs = CASE WHEN $4 THEN $8 ELSE cidrs END,
				expires_at = CASE WHEN $9 THEN $10::timestamptz ELSE expires_at END,
				updated_at = now()
			WHERE id = $1`, p.ID, p.Name, p.DefaultPriority, setScopes, models, endpoints, prio, cidrs, p.ExpiresAt != nil, expires)
		return err
	})
	if err != nil {
		return nil, err
	}
	return s.KeyByID(ctx, p.ID)
}

// RevokeKey ends a key at once: every process stops accepting it within
// seconds (ErrNotFound if it is unknown or already revoked).
func (s *Store) RevokeKey(ctx context.Context, id uuid.UUID, actor string) (*Key, error) {
	if err := s.changeKey(ctx, id, actor, "key.revoke", func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, `UPDATE api_keys SET revoked_at = now(), previous_hash = NULL, previous_expires_at = NULL, updated_at = now() WHERE id = $1`, id)
		return err
	}); err != nil {
		return nil, err
	}
	return s.KeyByID(ctx, id)
}

// RotateKey gives a key a new secret, returned this once; the old one keeps
// working for grace (0: not at all). A secret rotated out earlier and still
// in its grace stops now.
func (s *Store) RotateKey(ctx context.Context, id uuid.UUID, grace time.Duration, actor string) (*Key, string, error) {
	secret := NewSecret()
	if err := s.changeKey(ctx, id, actor, "key.rotate", func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, `UPDATE api_keys SET previous_hash = CASE WHEN $3::bigint > 0 THEN hash END,
				previous_expires_at = CASE WHEN $3::bigint > 0 THEN now() + make_interval(secs => $3::bigint) END,
				hash = $2, prefix = $4, updated_at = now()
			WHERE id = $1`, id, hashSecret(secret), int64(grace/time.Second), secret[:8])
		return err
	}); err != nil {
		return nil, "", err
	}
	k, err := s.KeyByID(ctx, id)
	return k, secret, err
}

// changeKey runs change on a key that is not revoked, with the audit row
// (before and after) and the event that makes every process forget it.
func (s *Store) changeKey(ctx context.Context, id uuid.UUID, actor, action string, change func(pgx.Tx) error) error {
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		var tenant uuid.UUID
		if err := tx.QueryRow(ctx, `SELECT k.tenant_id FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
			WHERE k.id = $1 AND k.revoked_at IS NULL AND t.deleted_at IS NULL FOR UPDATE OF k`, id).Scan(&tenant); err != nil {
			if errors.Is(err, pgx.ErrNoRows) {
				return ErrNotFound
			}
			return err
		}
		before, err := rowJSON(ctx, tx, keyAuditColumns, id)
		if err != nil {
			return err
		}
		if err := change(tx); err != nil {
			return err
		}
		after, err := rowJSON(ctx, tx, keyAuditColumns, id)
		if err != nil {
			return err
		}
		if err := keyEvent(ctx, tx, id, uuid.Nil); err != nil {
			return err
		}
		return audit(ctx, tx, actorOr(actor), action, "key", id.String(), tenant, before, after)
	})
	if err != nil {
		return fmt.Errorf("store: %s %s: %w", action, id, err)
	}
	return nil
}

// KeyEvent says a key (KeyID) or all a tenant's keys (TenantID) changed.
type KeyEvent struct {
	ID       int64
	KeyID    uuid.UUID
	TenantID uuid.UUID
}

// RecentKeyEvents returns the events of the last window. A reader that asks
// every second with a window of several seconds sees every event even if
// the transaction that wrote it committed late; seeing one twice is
// harmless.
func (s *Store) RecentKeyEvents(ctx context.Context, window time.Duration) ([]KeyEvent, error) {
	rows, err := s.pool.Query(ctx, `SELECT id, coalesce(key_id, '00000000-0000-0000-0000-000000000000'), coalesce(tenant_id, '00000000-0000-0000-0000-000000000000')
		FROM key_events WHERE at > clock_timestamp() - make_interval(secs => $1::double precision) ORDER BY id`, window.Seconds())
	if err != nil {
		return nil, fmt.Errorf("store: key events: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (KeyEvent, error) {
		var e KeyEvent
		err := r.Scan(&e.ID, &e.KeyID, &e.TenantID)
		return e, err
	})
}

// TouchKeys records when keys (and admin keys) were last used, in one
// statement each for many: the request path only notes it in memory.
func (s *Store) TouchKeys(ctx context.Context, keys, adminKeys map[uuid.UUID]time.Time) error {
	for _, t := range []struct {
		table string
		m     map[uuid.UUID]time.Time
	}{{"api_keys", keys}, {"admin_keys", adminKeys}} {
		if len(t.m) == 0 {
			continue
		}
		ids := make([]uuid.UUID, 0, len(t.m))
		ats := make([]time.Time, 0, len(t.m))
		for id, at := range t.m {
			ids, ats = append(ids, id), append(ats, at)
		}
		if _, err := s.pool.Exec(ctx, `UPDATE `+t.table+` x SET last_used_at = greatest(x.last_used_at, u.at)
			FROM unnest($1::uuid[], $2::timestamptz[]) AS u(id, at) WHERE x.id = u.id`, ids, ats); err != nil {
			return fmt.Errorf("store: touch keys: %w", err)
		}
	}
	return nil
}

// PruneKeyEvents drops events no reader needs any more.
func (s *Store) PruneKeyEvents(ctx context.Context, older time.Duration) error {
	_, err := s.pool.Exec(ctx, `DELETE FROM key_events WHERE at < now() - make_interval(secs => $1::double precision)`, older.Seconds())
	return err
}

// AdminKey administers the gateway; its secret is never stored.
type AdminKey struct {
	ID         uuid.UUID
	Prefix     string
	Name       string
	CreatedAt  time.Time
	CreatedBy  string
	RevokedAt  time.Time
	LastUsedAt time.Time
}

// CreateAdminKey makes an admin key and returns its secret, shown once.
func (s *Store) CreateAdminKey(ctx context.Context, name, actor string) (*AdminKey, string, error) {
	secret := newSecret(AdminKeyPrefix)
	id, _ := uuid.NewV7()
	a := &AdminKey{ID: id, Prefix: secret[:9], Name: name, CreatedBy: actorOr(actor)}
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		if err := tx.QueryRow(ctx, `INSERT INTO admin_keys (id, hash, prefix, name, created_by) VALUES ($1, $2, $3, $4, $5) RETURNING created_at`,
			id, hashSecret(secret), a.Prefix, name, a.CreatedBy).Scan(&a.CreatedAt); err != nil {
			return err
		}
		after, _ := json.Marshal(map[string]any{"id": id, "prefix": a.Prefix, "name": name})
		return audit(ctx, tx, a.CreatedBy, "admin_key.create", "admin_key", id.String(), uuid.Nil, nil, after)
	})
	if err != nil {
		return nil, "", fmt.Errorf("store: create admin key: %w", err)
	}
	return a, secret, nil
}

// AdminKeyBySecret authenticates an admin key (ErrNotFound: none valid).
func (s *Store) AdminKeyBySecret(ctx context.Context, secret string) (*AdminKey, error) {
	h := hashSecret(secret)
	a := &AdminKey{}
	var stored []byte
	var used *time.Time
	err := s.pool.QueryRow(ctx, `SELECT id, prefix, name, created_at, created_by, last_used_at, hash FROM admin_keys WHERE hash = $1 AND revoked_at IS NULL`, h).
		Scan(&a.ID, &a.Prefix, &a.Name, &a.CreatedAt, &a.CreatedBy, &used, &stored)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("store: admin key: %w", err)
	}
	if subtle.ConstantTimeCompare(stored, h) != 1 {
		return nil, ErrNotFound
	}
	if used != nil {
		a.LastUsedAt = *used
	}
	return a, nil
}

// RevokeAdminKey ends an admin key.
func (s *Store) RevokeAdminKey(ctx context.Context, id uuid.UUID, actor string) error {
	const row = `SELECT id, prefix, name, created_by, revoked_at FROM admin_keys WHERE id = $1`
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		before, err := rowJSON(ctx, tx, row+` FOR UPDATE`, id)
		if err != nil {
			return err
		}
		tag, err := tx.Exec(ctx, `UPDATE admin_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL`, id)
		if err != nil {
			return err
		}
		if tag.RowsAffected() == 0 {
			return ErrNotFound
		}
		if err := keyEvent(ctx, tx, id, uuid.Nil); err != nil {
			return err
		}
		after, err := rowJSON(ctx, tx, row, id)
		if err != nil {
			return err
		}
		return audit(ctx, tx, actorOr(actor), "admin_key.revoke", "admin_key", id.String(), uuid.Nil, before, after)
	})
	if err != nil {
		return fmt.Errorf("store: revoke admin key: %w", err)
	}
	return nil
}

// AuditEntry is one administrative change.
type AuditEntry struct {
	ID         uuid.UUID
	At         time.Time
	Actor      string
	Action     string
	TargetType string
	TargetID   string
	TenantID   uuid.UUID
	Before     json.RawMessage
	After      json.RawMessage
}

// ListAudit pages the audit log, oldest first: entries after the entry
// after (uuid.Nil: from the first), of one tenant if tenant is set.
func (s *Store) ListAudit(ctx context.Context, tenant, after uuid.UUID, limit int) ([]AuditEntry, error) {
	rows, err := s.pool.Query(ctx, `SELECT id, at, actor, action, target_type, target_id, coalesce(tenant_id, '00000000-0000-0000-0000-000000000000'), before, after
		FROM audit_log WHERE ($1::uuid IS NULL OR tenant_id = $1) AND ($2::uuid IS NULL OR id > $2) ORDER BY id LIMIT $3`,
		nullUUID(tenant), nullUUID(after), limit)
	if err != nil {
		return nil, fmt.Errorf("store: audit log: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (AuditEntry, error) {
		var e AuditEntry
		var before, after []byte
		err := r.Scan(&e.ID, &e.At, &e.Actor, &e.Action, &e.TargetType, &e.TargetID, &e.TenantID, &before, &after)
		e.Before, e.After = before, after
		return e, err
	})
}
