package api

import (
	"context"
	"encoding/json"
	"fmt"
	"sync/atomic"

	"github.com/google/uuid"
	"github.com/nats-io/nats.go"

	"github.com/levee-gw/levee/store"
)

// keyBus tells the other processes at once of a key change made through
// this one's admin API (a revocation, rotation, rescoping, a tenant's
// deletion), so they stop trusting what they cached within milliseconds.
// The key events in Postgres, read every second by RunKeys, remain the
// record every process catches up from: the CLI, which has no NATS, and a
// process that missed a message (NATS is at-most-once here) rely on them.
type keyBus struct {
	nc      atomic.Pointer[nats.Conn]
	subject string
}

type keyMsg struct {
	Key    uuid.UUID `json:"k,omitempty"`
	Tenant uuid.UUID `json:"t,omitempty"`
}

// ShareKeys announces this process's key changes on nc and applies the
// others' until ctx ends; subject separates independent fleets on one NATS
// (tests); empty means "levee.keys".
func (s *Server) ShareKeys(ctx context.Context, nc *nats.Conn, subject string) error {
	if subject == "" {
		subject = "levee.keys"
	}
	s.bus.subject = subject
	sub, err := nc.Subscribe(subject, func(m *nats.Msg) {
		var km keyMsg
		if json.Unmarshal(m.Data, &km) != nil {
			return
		}
		s.forgetKeys(store.KeyEvent{KeyID: km.Key, TenantID: km.Tenant})
	})
	if err != nil {
		return fmt.Errorf("api: share key changes: %w", err)
	}
	defer sub.Unsubscribe()
	s.bus.nc.Store(nc)
	defer s.bus.nc.Store(nil)
	<-ctx.Done()
	return nil
}

// announce forgets a changed key (or a tenant's keys) here and tells the
// other processes to.
func (s *Server) announce(key, tenant uuid.UUID) {
	s.forgetKeys(store.KeyEvent{KeyID: key, TenantID: tenant})
	nc := s.bus.nc.Load()
	if nc == nil {
		return
	}
	data, _ := json.Marshal(keyMsg{Key: key, Tenant: tenant})
	if err := nc.Publish(s.bus.subject, data); err != nil {
		// The key events reach the others within seconds regardless.
		s.log.Warn("announcing a key change", "err", err)
	}
}

// forgetKeys drops what this process cached about the event's key or
// tenant: its next use is looked up again.
func (s *Server) forgetKeys(e store.KeyEvent) {
	s.keys.forget(e.KeyID, e.TenantID)
	if e.KeyID != uuid.Nil {
		s.admins.forget(e.KeyID)
	}
	if e.TenantID != uuid.Nil {
		s.tenants.mu.Lock()
		clear(s.tenants.m)
		s.tenants.mu.Unlock()
	}
}
