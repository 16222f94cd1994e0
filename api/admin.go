package api

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/labstack/echo/v4"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/store"
	"github.com/levee-gw/levee/strictjson"
)

// The admin API (/admin/v1/) administers tenants, their keys, limits and
// budgets, reads usage across tenants and the audit log. It answers admin
// keys (lva-…) only: a tenant key is refused there as unknown.

type adminCache struct {
	mu   sync.RWMutex
	good map[[32]byte]cachedAdmin
	// bootstrap is the hash of the admin key from the environment.
	bootstrap []byte
}

type cachedAdmin struct {
	key     *store.AdminKey
	expires time.Time
}

func newAdminCache(bootstrap string) *adminCache {
	c := &adminCache{good: map[[32]byte]cachedAdmin{}}
	if bootstrap != "" {
		h := sha256.Sum256([]byte(bootstrap))
		c.bootstrap = h[:]
	}
	return c
}

func (c *adminCache) forget(id uuid.UUID) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for h, e := range c.good {
		if e.key.ID == id {
			delete(c.good, h)
		}
	}
}

const adminContextKey = "levee.admin"

// actorOf names who makes an admin change, for the audit log.
func actorOf(c echo.Context) string {
	a, _ := c.Get(adminContextKey).(*store.AdminKey)
	if a == nil {
		return "admin:unknown"
	}
	if a.ID == uuid.Nil {
		return "admin:bootstrap"
	}
	return "admin:" + a.ID.String()
}

// authenticateAdmin requires an admin key: the bootstrap key of the
// environment, or one made with levee admin-key create. Failures cost the
// address as tenant-key failures do.
func (s *Server) authenticateAdmin(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		secret := presentedKey(c.Request())
		unauthorized := &Error{Status: http.StatusUnauthorized, Type: "invalid_request_error", Code: "invalid_admin_key",
			Message: "The admin API needs an admin key (lva-…) in Authorization: Bearer."}
		if !strings.HasPrefix(secret, store.AdminKeyPrefix) {
			return unauthorized
		}
		h := sha256.Sum256([]byte(secret))
		now := time.Now()
		if s.admins.bootstrap != nil && subtle.ConstantTimeCompare(h[:], s.admins.bootstrap) == 1 {
			c.Set(adminContextKey, &store.AdminKey{Name: "bootstrap"})
			return next(c)
		}
		s.admins.mu.RLock()
		e, ok := s.admins.good[h]
		s.admins.mu.RUnlock()
		if !ok || now.After(e.expires) {
			refund, allowed := s.failures.take(c.RealIP())
			if !allowed {
				return &Error{Status: http.StatusTooManyRequests, Type: "invalid_request_error", Code: "too_many_failed_authentications",
					Message: "Too many failed authentications from this address; retry later.", RetryAfter: time.Second}
			}
			ctx, cancel := s.dbContext(c.Request().Context())
			a, err := s.admin.AdminKeyBySecret(ctx, secret)
			cancel()
			switch {
			case errors.Is(err, store.ErrNotFound):
				s.metrics.authFailures.WithLabelValues("unknown_admin_key").Inc()
				return unauthorized
			case err != nil:
				refund()
				return err
			}
			refund()
			e = cachedAdmin{key: a, expires: now.Add(keyTTL)}
			s.admins.mu.Lock()
			if len(s.admins.good) >= 1000 {
				clear(s.admins.good)
			}
			s.admins.good[h] = e
			s.admins.mu.Unlock()
		}
		s.adminUsed.note(e.key.ID)
		c.Set(adminContextKey, e.key)
		return next(c)
	}
}

func (s *Server) adminRoutes() {
	e, auth, db := s.e, s.authenticateAdmin, s.bounded
	g := "/admin/v1"
	e.POST(g+"/tenants", s.adminCreateTenant, auth, db)
	e.GET(g+"/tenants", s.adminListTenants, auth, db)
	e.GET(g+"/tenants/:tenant", s.adminGetTenant, auth, db)
	e.POST(g+"/tenants/:tenant", s.adminUpdateTenant, auth, db)
	e.DELETE(g+"/tenants/:tenant", s.adminDeleteTenant, auth, db)
	e.POST(g+"/tenants/:tenant/keys", s.adminCreateKey, auth, db)
	e.GET(g+"/tenants/:tenant/keys", s.adminListKeys, auth, db)
	e.GET(g+"/keys/:id", s.adminGetKey, auth, db)
	e.POST(g+"/keys/:id", s.adminUpdateKey, auth, db)
	e.POST(g+"/keys/:id/revoke", s.adminRevokeKey, auth, db)
	e.POST(g+"/keys/:id/rotate", s.adminRotateKey, auth, db)
	e.GET(g+"/usage", s.adminUsage, auth) // an export pages its own queries
	e.GET(g+"/audit", s.adminAudit, auth, db)
	e.POST(g+"/admin_keys", s.adminCreateAdminKey, auth, db)
	e.POST(g+"/admin_keys/:id/revoke", s.adminRevokeAdminKey, auth, db)
	s.consoleRoutes()
}

type tenantObject struct {
	ID              string         `json:"id"`
	Object          string         `json:"object"`
	Name            string         `json:"name"`
	DefaultPriority string         `json:"default_priority"`
	CreatedAt       int64          `json:"created_at"`
	Limits          []limitsObject `json:"limits"`
	Budget          *budgetObject  `json:"budget"`
}

type limitsObject struct {
	Model       string `json:"model,omitempty"`
	TPM         int64  `json:"tpm,omitempty"`
	RPM         int64  `json:"rpm,omitempty"`
	Concurrency int64  `json:"concurrency,omitempty"`
}

type budgetObject struct {
	Amount      *json.Number `json:"amount,omitempty"`
	Currency    string       `json:"currency,omitempty"`
	Tokens      int64        `json:"tokens,omitempty"`
	Period      string       `json:"period"`
	ResetAt     *int64       `json:"reset_at,omitempty"`
	Soft        float64      `json:"soft,omitempty"`
	OnExhausted string       `json:"on_exhausted,omitempty"`
}

// tenantParam finds the tenant named in the path by id or by name.
func (s *Server) tenantParam(c echo.Context) (*store.Tenant, error) {
	v := c.Param("tenant")
	ctx := c.Request().Context()
	var t *store.Tenant
	var err error
	if id, perr := uuid.Parse(v); perr == nil {
		t, err = s.admin.TenantByID(ctx, id)
	} else {
		t, err = s.admin.TenantByName(ctx, v)
	}
	if errors.Is(err, store.ErrNotFound) {
		return nil, &Error{Status: http.StatusNotFound, Type: "invalid_request_error", Code: "tenant_not_found", Param: "tenant",
			Message: fmt.Sprintf("No tenant %q.", strictjson.Clip(v))}
	}
	return t, err
}

func (s *Server) renderTenant(ctx context.Context, t *store.Tenant) (*tenantObject, error) {
	lims, b, err := s.admin.QuotasOf(ctx, t.ID, uuid.Nil)
	if err != nil {
		return nil, err
	}
	return &tenantObject{ID: t.ID.String(), Object: "tenant", Name: t.Name, DefaultPriority: t.DefaultPriority, CreatedAt: t.CreatedAt.Unix(),
		Limits: renderLimits(lims), Budget: renderBudget(b)}, nil
}

func renderLimits(ls []store.Limits) []limitsObject {
	out := make([]limitsObject, 0, len(ls))
	for _, l := range ls {
		out = append(out, limitsObject{Model: l.Model, TPM: l.TPM, RPM: l.RPM, Concurrency: l.Concurrency})
	}
	return out
}

func renderBudget(b *store.Budget) *budgetObject {
	if b == nil {
		return nil
	}
	o := &budgetObject{Currency: b.Currency, Tokens: b.Tokens, Period: b.Period, Soft: b.Soft, OnExhausted: b.OnExhausted}
	if b.AmountNanos > 0 {
		m := money(b.AmountNanos)
		o.Amount = &m
	}
	if b.Period == "fixed" {
		r := b.ResetAt.Unix()
		o.ResetAt = &r
	}
	return o
}

// quotaUpdate is the limits and budget part of a tenant's or key's update:
// limits set the scopes listed (all zero: removed); a budget replaces the
// budget (null: removed; absent: unchanged).
type quotaUpdate struct {
	Limits []limitsObject   `json:"limits"`
	Budget *json.RawMessage `json:"budget"`
}

// checkQuotas validates u without applying it: a change is checked whole
// before any part of it is made, so a bad budget does not leave a tenant
// created or a key rescoped behind a 400.
func (s *Server) checkQuotas(u *quotaUpdate) error {
	return s.applyQuotas(context.Background(), uuid.Nil, uuid.Nil, u, "")
}

// applyQuotas checks u and, with a tenant, applies it.
func (s *Server) applyQuotas(ctx context.Context, tenant, key uuid.UUID, u *quotaUpdate, actor string) error {
	for i, l := range u.Limits {
		if l.TPM < 0 || l.RPM < 0 || l.Concurrency < 0 {
			return invalid(fmt.Sprintf("limits[%d]", i), "invalid_limits", "Limits must not be negative (0 removes one).")
		}
		if l.Model != "" && !slices.Contains(s.broker.Models(), l.Model) {
			return invalid(fmt.Sprintf("limits[%d].model", i), "model_not_found", "No model alias %q.", strictjson.Clip(l.Model))
		}
	}
	var budget *store.SetBudgetParams
	if u.Budget != nil {
		budget = &store.SetBudgetParams{TenantID: tenant, KeyID: key, Actor: actor}
		if string(*u.Budget) != "null" {
			var b budgetObject
			if err := decodeJSON(*u.Budget, &b); err != nil {
				return err
			}
			if err := s.budgetParams(&b, budget); err != nil {
				return err
			}
		}
	}
	if tenant == uuid.Nil {
		return nil
	}
	for _, l := range u.Limits {
		if err := s.admin.SetLimits(ctx, &store.SetLimitsParams{TenantID: tenant, KeyID: key, Model: l.Model, TPM: l.TPM, RPM: l.RPM,
			Concurrency: l.Concurrency, Actor: actor}); err != nil {
			return err
		}
	}
	if budget != nil {
		return s.admin.SetBudget(ctx, budget)
	}
	return nil
}

// budgetParams checks a budget as the CLI does.
func (s *Server) budgetParams(b *budgetObject, p *store.SetBudgetParams) error {
	switch b.Period {
	case "day", "month", "fixed":
	default:
		return invalid("budget.period", "invalid_budget", "period must be day, month or fixed.")
	}
	if b.Amount == nil && b.Tokens == 0 {
		return invalid("budget", "invalid_budget", "A budget needs an amount (with its currency) or tokens, or is null to remove it.")
	}
	if b.Amount != nil {
		v, err := strconv.ParseFloat(b.Amount.String(), 64)
		if err != nil || math.Round(v*1e9) < 1 || v > 1e8 {
			return invalid("budget.amount", "invalid_budget", "amount must be between 0.000000001 and 100000000.")
		}
		if b.Currency != s.prices.Currency {
			return invalid("budget.currency", "invalid_budget", "currency must be the price table's, %s.", s.prices.Currency)
		}
		p.AmountNanos, p.Currency = int64(math.Round(v*1e9)), b.Currency
	}
	if b.Tokens < 0 || b.Tokens > 1e15 {
		return invalid("budget.tokens", "invalid_budget", "tokens must be between 1 and 1000000000000000.")
	}
	p.Tokens, p.Period, p.Soft, p.OnExhausted = b.Tokens, b.Period, b.Soft, b.OnExhausted
	if p.Soft == 0 {
		p.Soft = 0.8
	}
	if p.Soft <= 0 || p.Soft > 1 {
		return invalid("budget.soft", "invalid_budget", "soft must be in (0, 1].")
	}
	switch p.OnExhausted {
	case "":
		p.OnExhausted = "wait"
	case "wait", "fail":
	default:
		return invalid("budget.on_exhausted", "invalid_budget", "on_exhausted must be wait or fail.")
	}
	if b.Period == "fixed" {
		if b.ResetAt == nil || !time.Unix(*b.ResetAt, 0).After(time.Now()) {
			return invalid("budget.reset_at", "invalid_budget", "A fixed budget needs reset_at (Unix seconds) in the future.")
		}
		p.ResetAt = time.Unix(*b.ResetAt, 0)
	}
	return nil
}

func (s *Server) adminCreateTenant(c echo.Context) error {
	raw, err := s.readBody(c)
	if err != nil {
		return err
	}
	var req struct {
		Name            string `json:"name"`
		DefaultPriority string `json:"default_priority"`
		quotaUpdate
	}
	if err := decodeJSON(raw, &req); err != nil {
		return err
	}
	if err := store.CheckTenantName(req.Name); err != nil {
		return invalid("name", "invalid_name", "%s", err.Error())
	}
	if req.DefaultPriority != "" && !slices.Contains(config.Priorities, req.DefaultPriority) {
		return invalid("default_priority", "invalid_priority", "default_priority must be high, normal or low.")
	}
	if err := s.checkQuotas(&req.quotaUpdate); err != nil {
		return err
	}
	ctx, actor := c.Request().Context(), actorOf(c)
	t, err := s.admin.CreateTenant(ctx, &store.CreateTenantParams{Name: req.Name, DefaultPriority: req.DefaultPriority, Actor: actor})
	if errors.Is(err, store.ErrExists) {
		return &Error{Status: http.StatusConflict, Type: "invalid_request_error", Code: "tenant_exists", Param: "name",
			Message: fmt.Sprintf("A tenant named %q exists (or existed: a deleted tenant's name still names its usage).", req.Name)}
	}
	if err != nil {
		return err
	}
	if err := s.applyQuotas(ctx, t.ID, uuid.Nil, &req.quotaUpdate, actor); err != nil {
		return err
	}
	o, err := s.renderTenant(ctx, t)
	if err != nil {
		return err
	}
	return c.JSON(http.StatusCreated, o)
}

func (s *Server) adminListTenants(c echo.Context) error {
	limit, err := limitParam(c)
	if err != nil {
		return err
	}
	ctx := c.Request().Context()
	list, err := s.admin.ListTenants(ctx, c.QueryParam("after"), limit+1)
	if err != nil {
		return err
	}
	more := len(list) > limit
	list = list[:min(len(list), limit)]
	data := make([]*tenantObject, 0, len(list))
	for i := range list {
		o, err := s.renderTenant(ctx, &list[i])
		if err != nil {
			return err
		}
		data = append(data, o)
	}
	out := map[string]any{"object": "list", "data": data, "has_more": more, "last_id": nil}
	if len(list) > 0 {
		out["last_id"] = list[len(list)-1].Name // the cursor: ?after=<name>
	}
	return c.JSON(http.StatusOK, out)
}

func limitParam(c echo.Context) (int, error) {
	limit := 20
	if v := c.QueryParam("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 100 {
			return 0, invalid("limit", "invalid_limit", "limit must be between 1 and 100.")
		}
		limit = n
	}
	return limit, nil
}

func (s *Server) adminGetTenant(c echo.Context) error {
	t, err := s.tenantParam(c)
	if err != nil {
		return err
	}
	o, err := s.renderTenant(c.Request().Context(), t)
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, o)
}

func (s *Server) adminUpdateTenant(c echo.Context) error {
	t, err := s.tenantParam(c)
	if err != nil {
		return err
	}
	raw, err := s.readBody(c)
	if err != nil {
		return err
	}
	var req struct {
		DefaultPriority *string `json:"default_priority"`
		quotaUpdate
	}
	if err := decodeJSON(raw, &req); err != nil {
		return err
	}
	if req.DefaultPriority != nil && !slices.Contains(config.Priorities, *req.DefaultPriority) {
		return invalid("default_priority", "invalid_priority", "default_priority must be high, normal or low.")
	}
	if err := s.checkQuotas(&req.quotaUpdate); err != nil {
		return err
	}
	ctx, actor := c.Request().Context(), actorOf(c)
	if req.DefaultPriority != nil {
		if t, err = s.admin.UpdateTenant(ctx, &store.UpdateTenantParams{ID: t.ID, DefaultPriority: req.DefaultPriority, Actor: actor}); err != nil {
			return err
		}
		s.announce(uuid.Nil, t.ID)
	}
	if err := s.applyQuotas(ctx, t.ID, uuid.Nil, &req.quotaUpdate, actor); err != nil {
		return err
	}
	o, err := s.renderTenant(ctx, t)
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, o)
}

func (s *Server) adminDeleteTenant(c echo.Context) error {
	t, err := s.tenantParam(c)
	if err != nil {
		return err
	}
	force := false
	if v := c.QueryParam("force"); v != "" {
		if force, err = strconv.ParseBool(v); err != nil {
			return invalid("force", "invalid_request", "force must be true or false.")
		}
	}
	err = s.admin.DeleteTenant(c.Request().Context(), t.ID, force, actorOf(c))
	if errors.Is(err, store.ErrHasWork) {
		return &Error{Status: http.StatusConflict, Type: "invalid_request_error", Code: "tenant_has_work",
			Message: "The tenant has queued or running work (" + strings.TrimPrefix(err.Error(), "store: delete tenant: "+store.ErrHasWork.Error()+": ") +
				"); delete with ?force=true to cancel it."}
	}
	if err != nil {
		return err
	}
	s.announce(uuid.Nil, t.ID)
	return c.JSON(http.StatusOK, map[string]any{"id": t.ID.String(), "object": "tenant.deleted", "deleted": true})
}

type keyObject struct {
	ID              string       `json:"id"`
	Object          string       `json:"object"`
	TenantID        string       `json:"tenant_id"`
	Tenant          string       `json:"tenant"`
	Name            string       `json:"name"`
	Prefix          string       `json:"prefix"`
	DefaultPriority string       `json:"default_priority,omitempty"`
	Scopes          scopesObject `json:"scopes"`
	CreatedAt       int64        `json:"created_at"`
	LastUsedAt      *int64       `json:"last_used_at"`
	ExpiresAt       *int64       `json:"expires_at"`
	RevokedAt       *int64       `json:"revoked_at"`
	// Secret is shown when a key is made or rotated, and never again.
	Secret string         `json:"secret,omitempty"`
	Limits []limitsObject `json:"limits"`
	Budget *budgetObject  `json:"budget"`
}

type scopesObject struct {
	Models      []string `json:"models"`
	Endpoints   []string `json:"endpoints"`
	MaxPriority *string  `json:"max_priority"`
	CIDRs       []string `json:"cidrs"`
}

func unixOrNil(t time.Time) *int64 {
	if t.IsZero() {
		return nil
	}
	u := t.Unix()
	return &u
}

func (s *Server) renderKey(ctx context.Context, k *store.Key) (*keyObject, error) {
	lims, b, err := s.admin.QuotasOf(ctx, k.TenantID, k.ID)
	if err != nil {
		return nil, err
	}
	o := &keyObject{ID: k.ID.String(), Object: "api_key", TenantID: k.TenantID.String(), Tenant: k.TenantName, Name: k.Name, Prefix: k.Prefix,
		DefaultPriority: k.KeyPriority(), CreatedAt: k.CreatedAt.Unix(), LastUsedAt: unixOrNil(k.LastUsedAt), ExpiresAt: unixOrNil(k.ExpiresAt),
		RevokedAt: unixOrNil(k.RevokedAt), Scopes: scopesObject{Models: k.Scopes.Models, Endpoints: k.Scopes.Endpoints},
		Limits: renderLimits(lims), Budget: renderBudget(b)}
	if k.Scopes.MaxPriority != "" {
		o.Scopes.MaxPriority = &k.Scopes.MaxPriority
	}
	for _, p := range k.Scopes.CIDRs {
		o.Scopes.CIDRs = append(o.Scopes.CIDRs, p.String())
	}
	return o, nil
}

// keyRequest is a key's fields as the admin API takes them. Scopes, when
// present, replace the key's scopes whole; expires_at null removes the
// expiry.
type keyRequest struct {
	Name            *string          `json:"name"`
	DefaultPriority *string          `json:"default_priority"`
	Scopes          *scopesObject    `json:"scopes"`
	ExpiresAt       *json.RawMessage `json:"expires_at"`
	quotaUpdate
}

const maxCIDRs = 64

// maxUnix is 9999-12-31T23:59:59Z.
const maxUnix = 253402300799

func (s *Server) keyFields(r *keyRequest) (scopes *store.Scopes, expires *time.Time, err error) {
	if r.Name != nil && (len(*r.Name) > 128 || !strictjson.ValidText(*r.Name)) {
		return nil, nil, invalid("name", "invalid_name", "name must be at most 128 characters, without control characters.")
	}
	if r.DefaultPriority != nil && *r.DefaultPriority != "" && !slices.Contains(config.Priorities, *r.DefaultPriority) {
		return nil, nil, invalid("default_priority", "invalid_priority", "default_priority must be high, normal or low (or \"\" for the tenant's).")
	}
	if r.Scopes != nil {
		sc := &store.Scopes{Models: r.Scopes.Models, Endpoints: r.Scopes.Endpoints}
		for i, m := range sc.Models {
			if !slices.Contains(s.broker.Models(), m) {
				return nil, nil, invalid(fmt.Sprintf("scopes.models[%d]", i), "model_not_found", "No model alias %q.", strictjson.Clip(m))
			}
		}
		for i, e := range sc.Endpoints {
			if !slices.Contains(config.EndpointGroups, e) {
				return nil, nil, invalid(fmt.Sprintf("scopes.endpoints[%d]", i), "invalid_scope", "%q is not one of %s.", strictjson.Clip(e), strings.Join(config.EndpointGroups, ", "))
			}
		}
		if p := r.Scopes.MaxPriority; p != nil {
			if !slices.Contains(config.Priorities, *p) {
				return nil, nil, invalid("scopes.max_priority", "invalid_scope", "max_priority must be high, normal or low.")
			}
			sc.MaxPriority = *p
		}
		if len(r.Scopes.CIDRs) > maxCIDRs {
			return nil, nil, invalid("scopes.cidrs", "invalid_scope", "At most %d address ranges.", maxCIDRs)
		}
		for i, c := range r.Scopes.CIDRs {
			p, err := netip.ParsePrefix(c)
			if err != nil {
				return nil, nil, invalid(fmt.Sprintf("scopes.cidrs[%d]", i), "invalid_scope", "%q is not an address range such as 10.0.0.0/8 or 2001:db8::/32.", strictjson.Clip(c))
			}
			sc.CIDRs = append(sc.CIDRs, p.Masked())
		}
		if r.Scopes.CIDRs != nil && sc.CIDRs == nil {
			sc.CIDRs = []netip.Prefix{} // an empty list: no address may use it
		}
		scopes = sc
	}
	if r.ExpiresAt != nil {
		var t time.Time
		if string(*r.ExpiresAt) != "null" {
			var unix int64
			// Up to the end of year 9999: beyond, Postgres (and pgx's
			// microseconds) cannot hold it as it was meant.
			if err := strictjson.Unmarshal(*r.ExpiresAt, &unix); err != nil || unix <= 0 || unix > maxUnix {
				return nil, nil, invalid("expires_at", "invalid_expiry", "expires_at must be Unix seconds (or null for none).")
			}
			t = time.Unix(unix, 0)
		}
		expires = &t
	}
	return scopes, expires, nil
}

func (s *Server) adminCreateKey(c echo.Context) error {
	t, err := s.tenantParam(c)
	if err != nil {
		return err
	}
	raw, err := s.readBody(c)
	if err != nil {
		return err
	}
	var req keyRequest
	if err := decodeJSON(raw, &req); err != nil {
		return err
	}
	scopes, expires, err := s.keyFields(&req)
	if err != nil {
		return err
	}
	if err := s.checkQuotas(&req.quotaUpdate); err != nil {
		return err
	}
	p := &store.CreateKeyParams{TenantID: t.ID, Actor: actorOf(c)}
	if req.Name != nil {
		p.Name = *req.Name
	}
	if req.DefaultPriority != nil {
		p.DefaultPriority = *req.DefaultPriority
	}
	if scopes != nil {
		p.Scopes = *scopes
	}
	if expires != nil {
		if !expires.IsZero() && !expires.After(time.Now()) {
			return invalid("expires_at", "invalid_expiry", "expires_at must be in the future.")
		}
		p.ExpiresAt = *expires
	}
	ctx := c.Request().Context()
	k, secret, err := s.admin.CreateKey(ctx, p)
	if err != nil {
		return err
	}
	if err := s.applyQuotas(ctx, t.ID, k.ID, &req.quotaUpdate, p.Actor); err != nil {
		return err
	}
	o, err := s.renderKey(ctx, k)
	if err != nil {
		return err
	}
	o.Secret = secret
	return c.JSON(http.StatusCreated, o)
}

func (s *Server) adminListKeys(c echo.Context) error {
	t, err := s.tenantParam(c)
	if err != nil {
		return err
	}
	limit, err := limitParam(c)
	if err != nil {
		return err
	}
	var after uuid.UUID
	if v := c.QueryParam("after"); v != "" {
		if after, err = uuid.Parse(v); err != nil {
			return invalid("after", "invalid_cursor", "after must be a key id from a previous page.")
		}
	}
	ctx := c.Request().Context()
	list, err := s.admin.ListKeys(ctx, t.ID, after, limit+1)
	if err != nil {
		return err
	}
	more := len(list) > limit
	list = list[:min(len(list), limit)]
	data := make([]*keyObject, 0, len(list))
	for i := range list {
		o, err := s.renderKey(ctx, &list[i])
		if err != nil {
			return err
		}
		data = append(data, o)
	}
	out := map[string]any{"object": "list", "data": data, "has_more": more, "last_id": nil}
	if len(data) > 0 {
		out["last_id"] = data[len(data)-1].ID
	}
	return c.JSON(http.StatusOK, out)
}

// keyParam finds the key named in the path (revoked ones too).
func (s *Server) keyParam(c echo.Context) (*store.Key, error) {
	notFound := &Error{Status: http.StatusNotFound, Type: "invalid_request_error", Code: "key_not_found", Param: "id",
		Message: fmt.Sprintf("No key %q.", strictjson.Clip(c.Param("id")))}
	id, err := uuid.Parse(c.Param("id"))
	if err != nil {
		return nil, notFound
	}
	k, err := s.admin.KeyByID(c.Request().Context(), id)
	if errors.Is(err, store.ErrNotFound) {
		return nil, notFound
	}
	return k, err
}

func (s *Server) adminGetKey(c echo.Context) error {
	k, err := s.keyParam(c)
	if err != nil {
		return err
	}
	o, err := s.renderKey(c.Request().Context(), k)
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, o)
}

// keyGone is a change asked of a revoked key (or one of a deleted tenant).
func keyGone(id string) *Error {
	return &Error{Status: http.StatusConflict, Type: "invalid_request_error", Code: "key_revoked", Param: "id",
		Message: fmt.Sprintf("Key %s is revoked; make a new one.", id)}
}

func (s *Server) adminUpdateKey(c echo.Context) error {
	k, err := s.keyParam(c)
	if err != nil {
		return err
	}
	if !k.RevokedAt.IsZero() {
		// Its limits and budget too: a revoked key is not changed.
		return keyGone(c.Param("id"))
	}
	raw, err := s.readBody(c)
	if err != nil {
		return err
	}
	var req keyRequest
	if err := decodeJSON(raw, &req); err != nil {
		return err
	}
	scopes, expires, err := s.keyFields(&req)
	if err != nil {
		return err
	}
	if err := s.checkQuotas(&req.quotaUpdate); err != nil {
		return err
	}
	ctx, actor := c.Request().Context(), actorOf(c)
	if req.Name != nil || req.DefaultPriority != nil || scopes != nil || expires != nil {
		k, err = s.admin.UpdateKey(ctx, &store.UpdateKeyParams{ID: k.ID, Name: req.Name, DefaultPriority: req.DefaultPriority, Scopes: scopes,
			ExpiresAt: expires, Actor: actor})
		if errors.Is(err, store.ErrNotFound) {
			return keyGone(c.Param("id"))
		}
		if err != nil {
			return err
		}
		s.announce(k.ID, uuid.Nil)
	}
	if err := s.applyQuotas(ctx, k.TenantID, k.ID, &req.quotaUpdate, actor); err != nil {
		return err
	}
	o, err := s.renderKey(ctx, k)
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, o)
}

func (s *Server) adminRevokeKey(c echo.Context) error {
	k, err := s.keyParam(c)
	if err != nil {
		return err
	}
	k, err = s.admin.RevokeKey(c.Request().Context(), k.ID, actorOf(c))
	if errors.Is(err, store.ErrNotFound) {
		return keyGone(c.Param("id"))
	}
	if err != nil {
		return err
	}
	s.announce(k.ID, uuid.Nil)
	o, err := s.renderKey(c.Request().Context(), k)
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, o)
}

// maxGrace bounds how long a rotated-out secret may keep working.
const maxGrace = 30 * 24 * time.Hour

func (s *Server) adminRotateKey(c echo.Context) error {
	k, err := s.keyParam(c)
	if err != nil {
		return err
	}
	raw, err := s.readBody(c)
	if err != nil {
		return err
	}
	var req struct {
		GraceSeconds int64 `json:"grace_seconds"`
	}
	if len(raw) > 0 {
		if err := decodeJSON(raw, &req); err != nil {
			return err
		}
	}
	if req.GraceSeconds < 0 || req.GraceSeconds > int64(maxGrace/time.Second) {
		return invalid("grace_seconds", "invalid_grace", "grace_seconds must be between 0 and %d (30 days).", int64(maxGrace/time.Second))
	}
	k, secret, err := s.admin.RotateKey(c.Request().Context(), k.ID, time.Duration(req.GraceSeconds)*time.Second, actorOf(c))
	if errors.Is(err, store.ErrNotFound) {
		return keyGone(c.Param("id"))
	}
	if err != nil {
		return err
	}
	s.announce(k.ID, uuid.Nil)
	o, err := s.renderKey(c.Request().Context(), k)
	if err != nil {
		return err
	}
	o.Secret = secret
	return c.JSON(http.StatusOK, o)
}

// adminUsage exports usage across tenants, grouped, as JSON or (Accept:
// text/csv) CSV; both are written as they are read, a page at a time.
func (s *Server) adminUsage(c echo.Context) error {
	from, to, err := dateWindow(c)
	if err != nil {
		return err
	}
	p := &store.UsageExportParams{From: from, To: to}
	if v := c.QueryParam("group_by"); v != "" {
		for _, g := range strings.Split(v, ",") {
			if !slices.Contains(store.UsageGroups, g) {
				return invalid("group_by", "invalid_group", "group_by takes %s, not %q.", strings.Join(store.UsageGroups, ", "), strictjson.Clip(g))
			}
			if !slices.Contains(p.GroupBy, g) {
				p.GroupBy = append(p.GroupBy, g)
			}
		}
	}
	if v := c.QueryParam("tenant"); v != "" {
		c.SetParamNames("tenant")
		c.SetParamValues(v)
		t, err := s.tenantParam(c)
		if err != nil {
			return err
		}
		p.TenantID = t.ID
	}
	csvOut := strings.Contains(c.Request().Header.Get("Accept"), "text/csv")
	w := c.Response()
	rc := http.NewResponseController(w)
	// A client that stops reading is cut off rather than holding the
	// export (and its page of rows) open.
	deadline := func() { _ = rc.SetWriteDeadline(time.Now().Add(30 * time.Second)) }
	cols := store.UsageExportColumns(p.GroupBy)
	values := func(r *store.UsageExportRow) []string { return r.Values(p.GroupBy) }
	started := false
	start := func(ct string) {
		if !started {
			started = true
			w.Header().Set("Content-Type", ct)
			w.WriteHeader(http.StatusOK)
		}
	}
	if csvOut {
		cw := csv.NewWriter(w)
		each := func(r *store.UsageExportRow) error {
			start("text/csv; charset=utf-8")
			deadline()
			if err := cw.Write(store.CSVCells(values(r))); err != nil {
				return err
			}
			cw.Flush()
			return cw.Error()
		}
		start("text/csv; charset=utf-8")
		deadline()
		if err = cw.Write(cols); err == nil {
			cw.Flush()
			err = s.admin.ExportUsage(c.Request().Context(), p, each)
		}
	} else {
		start("application/json")
		deadline()
		head, _ := json.Marshal(map[string]any{"object": "list", "currency": s.prices.Currency, "start_date": p.From.Format(time.DateOnly),
			"end_date": p.To.Format(time.DateOnly), "group_by": p.GroupBy})
		// The envelope is written around the rows as they come.
		_, err = w.Write(append(head[:len(head)-1], []byte(`,"data":[`)...))
		first := true
		each := func(r *store.UsageExportRow) error {
			line := map[string]any{}
			vs := values(r)
			for i, col := range cols {
				line[col] = vs[i]
			}
			for _, n := range []string{"requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens"} {
				line[n], _ = strconv.ParseInt(line[n].(string), 10, 64)
			}
			line["cost"] = money(r.CostNanos)
			b, err := json.Marshal(line)
			if err != nil {
				return err
			}
			if !first {
				b = append([]byte{','}, b...)
			}
			first = false
			deadline()
			_, err = w.Write(b)
			return err
		}
		if err == nil {
			err = s.admin.ExportUsage(c.Request().Context(), p, each)
		}
		if err == nil {
			_, err = w.Write([]byte("]}"))
		}
	}
	if err != nil {
		// Begun: the client sees a truncated body (no closing bracket, a
		// short CSV), not a second status.
		s.log.Warn("usage export broke off", "err", err)
		panic(http.ErrAbortHandler)
	}
	return nil
}

type auditObject struct {
	ID         string          `json:"id"`
	Object     string          `json:"object"`
	At         int64           `json:"at"`
	Actor      string          `json:"actor"`
	Action     string          `json:"action"`
	TargetType string          `json:"target_type"`
	TargetID   string          `json:"target_id"`
	TenantID   *string         `json:"tenant_id"`
	Before     json.RawMessage `json:"before"`
	After      json.RawMessage `json:"after"`
}

func (s *Server) adminAudit(c echo.Context) error {
	limit, err := limitParam(c)
	if err != nil {
		return err
	}
	var after, tenant uuid.UUID
	if v := c.QueryParam("after"); v != "" {
		if after, err = uuid.Parse(v); err != nil {
			return invalid("after", "invalid_cursor", "after must be an entry id from a previous page.")
		}
	}
	if v := c.QueryParam("tenant"); v != "" {
		if tenant, err = uuid.Parse(v); err != nil {
			return invalid("tenant", "invalid_request", "tenant must be a tenant id.")
		}
	}
	list, err := s.admin.ListAudit(c.Request().Context(), tenant, after, limit+1)
	if err != nil {
		return err
	}
	more := len(list) > limit
	list = list[:min(len(list), limit)]
	data := make([]auditObject, 0, len(list))
	for _, e := range list {
		o := auditObject{ID: e.ID.String(), Object: "audit_log.entry", At: e.At.Unix(), Actor: e.Actor, Action: e.Action,
			TargetType: e.TargetType, TargetID: e.TargetID, Before: e.Before, After: e.After}
		if e.TenantID != uuid.Nil {
			t := e.TenantID.String()
			o.TenantID = &t
		}
		if o.Before == nil {
			o.Before = json.RawMessage("null")
		}
		if o.After == nil {
			o.After = json.RawMessage("null")
		}
		data = append(data, o)
	}
	out := map[string]any{"object": "list", "data": data, "has_more": more, "last_id": nil}
	if len(data) > 0 {
		out["last_id"] = data[len(data)-1].ID
	}
	return c.JSON(http.StatusOK, out)
}

func (s *Server) adminCreateAdminKey(c echo.Context) error {
	raw, err := s.readBody(c)
	if err != nil {
		return err
	}
	var req struct {
		Name string `json:"name"`
	}
	if err := decodeJSON(raw, &req); err != nil {
		return err
	}
	if len(req.Name) > 128 || !strictjson.ValidText(req.Name) {
		return invalid("name", "invalid_name", "name must be at most 128 characters, without control characters.")
	}
	a, secret, err := s.admin.CreateAdminKey(c.Request().Context(), req.Name, actorOf(c))
	if err != nil {
		return err
	}
	return c.JSON(http.StatusCreated, map[string]any{"id": a.ID.String(), "object": "admin_key", "name": a.Name, "prefix": a.Prefix,
		"created_at": a.CreatedAt.Unix(), "secret": secret})
}

func (s *Server) adminRevokeAdminKey(c echo.Context) error {
	id, err := uuid.Parse(c.Param("id"))
	if err == nil {
		err = s.admin.RevokeAdminKey(c.Request().Context(), id, actorOf(c))
	}
	if err != nil && (errors.Is(err, store.ErrNotFound) || id == uuid.Nil) {
		return &Error{Status: http.StatusNotFound, Type: "invalid_request_error", Code: "admin_key_not_found", Param: "id",
			Message: fmt.Sprintf("No admin key %q that is not revoked.", strictjson.Clip(c.Param("id")))}
	}
	if err != nil {
		return err
	}
	s.announce(id, uuid.Nil)
	return c.JSON(http.StatusOK, map[string]any{"id": id.String(), "object": "admin_key", "revoked": true})
}
