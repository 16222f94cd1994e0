package quota

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/nats-io/nats.go"
)

// Sharing keeps every process's rate windows in step, as broker.Sharer does
// for deployments: each process charges locally on admission (so it never
// passes a limit on its own) and publishes its charges and its calls in
// flight every few milliseconds — at once when a charge leaves a scope near
// its limit — and folds the others' into its own windows. Together N
// processes can pass a limit by what the others admitted in the last few
// milliseconds; with the near-limit flush that is about one call per
// process.

type shareMsg struct {
	Origin string       `json:"o"`
	Seq    uint64       `json:"q"`
	Scopes []shareScope `json:"s,omitempty"`
	// Acks are the newest message of each other process this one has
	// applied.
	Acks map[string]uint64 `json:"a,omitempty"`
}

type shareScope struct {
	Scope    Scope   `json:"c"`
	Deltas   []delta `json:"d,omitempty"`
	Inflight *int64  `json:"i,omitempty"`
}

// Share runs the sharing over nc until ctx ends; subject separates
// independent fleets on one NATS (tests); empty means "levee.quota".
func (q *Quota) Share(ctx context.Context, nc *nats.Conn, subject string) error {
	if subject == "" {
		subject = "levee.quota"
	}
	origin := uuid.NewString()
	sub, err := nc.Subscribe(subject, func(m *nats.Msg) {
		var sm shareMsg
		if json.Unmarshal(m.Data, &sm) != nil {
			return
		}
		if sm.Origin == origin {
			return
		}
		now := q.now()
		q.mu.RLock()
		for _, s := range sm.Scopes {
			// A scope this process has no limits for (yet) is not kept.
			if l := q.limiters[s.Scope]; l != nil {
				l.apply(now, sm.Origin, s.Deltas, s.Inflight)
			}
		}
		q.mu.RUnlock()
		// Applied: acknowledged with this process's next message, which
		// goes at once.
		if q.received(sm.Origin, sm.Seq, sm.Acks[origin], len(sm.Scopes) > 0) {
			q.nudge()
		}
	})
	if err != nil {
		return fmt.Errorf("quota: share: %w", err)
	}
	defer sub.Unsubscribe()
	q.shared.Store(true)
	defer q.shared.Store(false)
	q.publish(nc, subject, origin, true) // hello: the others count this process from now
	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	beat := time.NewTicker(time.Second)
	defer beat.Stop()
	for {
		all := false
		select {
		case <-ctx.Done():
			q.publish(nc, subject, origin, false)
			return nil
		case <-t.C:
		case <-q.urgent:
		case <-beat.C:
			all = true // calls in flight are said again, so peers keep counting them
		}
		// Disconnected, nothing is kept for the others, and nobody waits
		// for an echo that cannot come.
		q.shared.Store(nc.IsConnected())
		q.publish(nc, subject, origin, all)
	}
}

// publish sends the news of the scopes marked dirty, or of every scope.
func (q *Quota) publish(nc *nats.Conn, subject, origin string, all bool) {
	now := q.now()
	q.dirtyMu.Lock()
	dirty := q.dirty
	n := len(dirty)
	if n > 0 {
		q.dirty = map[Scope]struct{}{}
	}
	q.dirtyMu.Unlock()
	seq := q.seq.Add(1)
	q.mu.RLock()
	var out []shareScope
	add := func(sc Scope, l *limiter) {
		if ds, inflight := l.drain(now, seq); len(ds) > 0 || inflight != nil {
			out = append(out, shareScope{Scope: sc, Deltas: ds, Inflight: inflight})
		}
	}
	if all {
		for sc, l := range q.limiters {
			add(sc, l)
		}
	} else if n > 0 {
		for sc := range dirty {
			if l := q.limiters[sc]; l != nil {
				add(sc, l)
			}
		}
	}
	q.mu.RUnlock()
	acks, due := q.acks()
	if len(out) == 0 && !all && !due {
		return
	}
	// Every second a message goes even with nothing in it: the others
	// count the processes sharing by them.
	raw, _ := json.Marshal(shareMsg{Origin: origin, Seq: seq, Scopes: out, Acks: acks})
	if err := nc.Publish(subject, raw); err != nil {
		q.log.Warn("quota: sharing limits", "err", err)
	}
}
