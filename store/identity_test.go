package store_test

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/levee-gw/levee/store"
)

func TestKeyLifecycle(t *testing.T) {
	_, st, _ := migrated(t)
	ctx := context.Background()
	ten, err := st.CreateTenant(ctx, &store.CreateTenantParams{Name: "acme", DefaultPriority: "normal", Actor: "test"})
	if err != nil {
		t.Fatal(err)
	}
	scopes := store.Scopes{Models: []string{"gpt-4o"}, Endpoints: []string{"chat", "jobs"}, MaxPriority: "normal",
		CIDRs: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}}
	k, secret, err := st.CreateKey(ctx, &store.CreateKeyParams{TenantID: ten.ID, Name: "app", Scopes: scopes, Actor: "test"})
	if err != nil {
		t.Fatal(err)
	}
	got, err := st.KeyBySecret(ctx, secret)
	if err != nil || got.ID != k.ID || !slices.Equal(got.Scopes.Models, scopes.Models) || !slices.Equal(got.Scopes.Endpoints, scopes.Endpoints) ||
		got.Scopes.MaxPriority != "normal" || !slices.Equal(got.Scopes.CIDRs, scopes.CIDRs) || got.DefaultPriority != "normal" {
		t.Fatalf("%v %+v", err, got)
	}

	// Rotation with a grace: both secrets work, the old one until the grace
	// ends; rotating again ends the old one at once.
	_, secret2, err := st.RotateKey(ctx, k.ID, time.Hour, "test")
	if err != nil {
		t.Fatal(err)
	}
	old, err := st.KeyBySecret(ctx, secret)
	if err != nil || old.ValidUntil.Before(time.Now().Add(59*time.Minute)) {
		t.Fatalf("the old secret in its grace: %v %+v", err, old)
	}
	if cur, err := st.KeyBySecret(ctx, secret2); err != nil || !cur.ValidUntil.IsZero() {
		t.Fatalf("the new secret: %v %+v", err, cur)
	}
	_, secret3, err := st.RotateKey(ctx, k.ID, 0, "test")
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{secret, secret2} {
		if _, err := st.KeyBySecret(ctx, s); !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("a secret rotated out without grace still works: %v", err)
		}
	}

	// Scopes are replaced whole; an expiry in the past makes the key expired.
	past := time.Now().Add(-time.Minute)
	if _, err := st.UpdateKey(ctx, &store.UpdateKeyParams{ID: k.ID, Scopes: &store.Scopes{Endpoints: []string{"embeddings"}}, ExpiresAt: &past, Actor: "test"}); err != nil {
		t.Fatal(err)
	}
	exp, err := st.KeyBySecret(ctx, secret3)
	if !errors.Is(err, store.ErrKeyExpired) || exp.Scopes.Models != nil || !slices.Equal(exp.Scopes.Endpoints, []string{"embeddings"}) {
		t.Fatalf("expired: %v %+v", err, exp)
	}
	var zero time.Time
	if _, err := st.UpdateKey(ctx, &store.UpdateKeyParams{ID: k.ID, ExpiresAt: &zero, Actor: "test"}); err != nil {
		t.Fatal(err)
	}
	if _, err := st.KeyBySecret(ctx, secret3); err != nil {
		t.Fatalf("expiry removed: %v", err)
	}

	// Revoked: gone, and not revocable twice.
	if _, err := st.RevokeKey(ctx, k.ID, "test"); err != nil {
		t.Fatal(err)
	}
	if _, err := st.KeyBySecret(ctx, secret3); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("revoked: %v", err)
	}
	if _, err := st.RevokeKey(ctx, k.ID, "test"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("revoked twice: %v", err)
	}

	// Every change is in the audit log, with the state before and after,
	// and in the key events every process reads.
	log, err := st.ListAudit(ctx, ten.ID, uuid.Nil, 100)
	if err != nil {
		t.Fatal(err)
	}
	var actions []string
	for _, e := range log {
		actions = append(actions, e.Action)
		if e.Actor != "test" {
			t.Fatalf("actor %q", e.Actor)
		}
	}
	want := []string{"tenant.create", "key.create", "key.rotate", "key.rotate", "key.update", "key.update", "key.revoke"}
	if !slices.Equal(actions, want) {
		t.Fatalf("audit %v, want %v", actions, want)
	}
	if rev := log[len(log)-1]; rev.Before == nil || rev.After == nil || string(rev.Before) == string(rev.After) {
		t.Fatalf("the revocation's before and after: %s / %s", rev.Before, rev.After)
	}
	if page, err := st.ListAudit(ctx, ten.ID, log[2].ID, 2); err != nil || len(page) != 2 || page[0].ID != log[3].ID {
		t.Fatalf("a page after the third entry: %v %d", err, len(page))
	}
	evs, err := st.RecentKeyEvents(ctx, 10*time.Second)
	if err != nil || len(evs) != 5 || evs[0].KeyID != k.ID {
		t.Fatalf("key events: %v %+v", err, evs)
	}
}

func TestTenantDeletionAndPages(t *testing.T) {
	_, st, _ := migrated(t)
	ctx := context.Background()
	var ids []uuid.UUID
	for _, n := range []string{"c", "a", "b"} {
		ten, err := st.CreateTenant(ctx, &store.CreateTenantParams{Name: n, Actor: "test"})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, ten.ID)
	}
	page, err := st.ListTenants(ctx, "a", 10)
	if err != nil || len(page) != 2 || page[0].Name != "b" || page[1].Name != "c" {
		t.Fatalf("%v %+v", err, page)
	}
	_, secret, err := st.CreateKey(ctx, &store.CreateKeyParams{TenantName: "c", Actor: "test"})
	if err != nil {
		t.Fatal(err)
	}
	j, _, err := st.InsertJob(ctx, &store.InsertJobParams{TenantID: ids[0], Endpoint: "/v1/chat/completions", Model: "gpt-4o", Body: []byte(`{}`), Priority: "low"})
	if err != nil {
		t.Fatal(err)
	}
	if err := st.DeleteTenant(ctx, ids[0], false, "test"); !errors.Is(err, store.ErrHasWork) {
		t.Fatalf("deleting a tenant with a queued job: %v", err)
	}
	if err := st.DeleteTenant(ctx, ids[0], true, "test"); err != nil {
		t.Fatal(err)
	}
	if got, err := st.JobByID(ctx, j.ID); err != nil || got.Status != "cancelled" {
		t.Fatalf("its queued job: %v %+v", err, got)
	}
	if _, err := st.KeyBySecret(ctx, secret); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("a deleted tenant's key: %v", err)
	}
	if _, err := st.TenantByName(ctx, "c"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("a deleted tenant by name: %v", err)
	}
	if _, err := st.CreateTenant(ctx, &store.CreateTenantParams{Name: "c", Actor: "test"}); !errors.Is(err, store.ErrExists) {
		t.Fatalf("a deleted tenant's name taken again: %v", err)
	}
	if name, err := st.TenantName(ctx, ids[0]); err != nil || name != "c" {
		t.Fatalf("its usage still names it: %v %q", err, name)
	}
	if page, _ := st.ListTenants(ctx, "", 10); len(page) != 2 {
		t.Fatalf("listed after deletion: %+v", page)
	}
}

func TestAdminKeys(t *testing.T) {
	_, st, _ := migrated(t)
	ctx := context.Background()
	a, secret, err := st.CreateAdminKey(ctx, "ops", "cli:test")
	if err != nil || len(secret) < 40 || secret[:4] != store.AdminKeyPrefix {
		t.Fatalf("%v %q", err, secret)
	}
	if got, err := st.AdminKeyBySecret(ctx, secret); err != nil || got.ID != a.ID {
		t.Fatalf("%v %+v", err, got)
	}
	// An admin key is no tenant key, and a tenant key's shape is refused
	// as an admin key's.
	if _, err := st.KeyBySecret(ctx, secret); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("an admin key as a tenant key: %v", err)
	}
	if _, err := st.CreateTenant(ctx, &store.CreateTenantParams{Name: "t", Actor: "test"}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := st.CreateKey(ctx, &store.CreateKeyParams{TenantName: "t", Secret: "lva-0123456789abcdef0123", Actor: "test"}); err == nil {
		t.Fatal("a tenant key shaped as an admin key was stored")
	}
	if err := st.TouchKeys(ctx, nil, map[uuid.UUID]time.Time{a.ID: time.Now()}); err != nil {
		t.Fatal(err)
	}
	if got, _ := st.AdminKeyBySecret(ctx, secret); got.LastUsedAt.IsZero() {
		t.Fatal("last use not recorded")
	}
	if err := st.RevokeAdminKey(ctx, a.ID, "cli:test"); err != nil {
		t.Fatal(err)
	}
	if _, err := st.AdminKeyBySecret(ctx, secret); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("revoked admin key: %v", err)
	}
}

// An export reads the rollup a page at a time and groups as asked; every
// group comes once, in order, and the sums are the rows'.
func TestExportUsagePagesAndGroups(t *testing.T) {
	_, st, _ := migrated(t)
	ctx := context.Background()
	ten, err := st.CreateTenant(ctx, &store.CreateTenantParams{Name: "acme", Actor: "test"})
	if err != nil {
		t.Fatal(err)
	}
	k, _, err := st.CreateKey(ctx, &store.CreateKeyParams{TenantID: ten.ID, Name: "app", Actor: "test"})
	if err != nil {
		t.Fatal(err)
	}
	// 1,500 (model, deployment) groups on one day, and one on the next.
	day := time.Date(2031, 3, 1, 0, 0, 0, 0, time.UTC)
	if _, err := st.Pool().Exec(ctx, `INSERT INTO usage_daily (tenant_id, day, model, key_id, deployment, requests, errors, prompt_tokens, completion_tokens, cost_nanos)
		SELECT $1::uuid, $2::date, 'm' || (i % 3), $3::uuid, 'd' || i, 1, 0, i, 1, 10 FROM generate_series(1, 1500) i
		UNION ALL SELECT $1::uuid, $2::date + 1, 'm0', $3::uuid, 'd1', 5, 1, 5, 5, 5`, ten.ID, day, k.ID); err != nil {
		t.Fatal(err)
	}
	collect := func(group ...string) []store.UsageExportRow {
		t.Helper()
		var out []store.UsageExportRow
		if err := st.ExportUsage(ctx, &store.UsageExportParams{From: day, To: day.AddDate(0, 0, 1), GroupBy: group},
			func(r *store.UsageExportRow) error { out = append(out, *r); return nil }); err != nil {
			t.Fatal(err)
		}
		return out
	}
	byDep := collect("deployment")
	if len(byDep) != 1500 || byDep[0].Deployment != "d1" || byDep[0].Requests != 6 || byDep[0].Model != "" {
		t.Fatalf("by deployment: %d groups, first %+v", len(byDep), byDep[0])
	}
	seen := map[string]bool{}
	for i, r := range byDep {
		if seen[r.Deployment] || (i > 0 && r.Deployment <= byDep[i-1].Deployment) {
			t.Fatalf("group %q twice or out of order at %d", r.Deployment, i)
		}
		seen[r.Deployment] = true
	}
	byTenantModel := collect("tenant", "key", "model")
	if len(byTenantModel) != 3 || byTenantModel[0].Tenant != "acme" || byTenantModel[0].KeyName != "app" || byTenantModel[0].Model != "m0" {
		t.Fatalf("by tenant, key and model: %+v", byTenantModel)
	}
	total := collect()
	var sum int64
	for i := 1; i <= 1500; i++ {
		sum += int64(i)
	}
	if len(total) != 1 || total[0].Requests != 1505 || total[0].PromptTokens != sum+5 || total[0].CostNanos != 15005 {
		t.Fatalf("totals: %+v", total)
	}
	if err := st.ExportUsage(ctx, &store.UsageExportParams{GroupBy: []string{"tenant_id; DROP TABLE tenants"}}, nil); err == nil {
		t.Fatal("an unknown group was accepted")
	}
}
