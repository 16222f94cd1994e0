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
