package broker

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/nats-io/nats.go"
)

// Sharer keeps the capacity views of every Levee process that uses the same
// deployments in step, over core NATS. Each process charges locally on
// arrival (so it never oversubscribes on its own) and publishes its charges,
// refunds and 429 penalties every few milliseconds on
// levee.capacity.<deployment>; every process folds the others' into its own
// windows at the bucket they were made in. The deployments' own
// x-ratelimit-remaining headers still correct any drift in each process.
// Charges carry their synchronous part and a flag for background calls, so
// every process's background pacer sees the fleet's synchronous rate and
// splits the background pace with the other processes pacing at the time.
//
// What it costs: between two flushes (every 5 ms, or at once when a charge
// leaves a deployment within 10 % of its limit) processes do not see each
// other's newest charges, so together they can overshoot a deployment by
// what the others admitted meanwhile; the deployment's 429 then penalizes it
// everywhere.
type Sharer struct {
	nc       *nats.Conn
	b        *Broker
	origin   string
	interval time.Duration
	log      *slog.Logger
	prefix   string
	urgent   chan struct{}
}

type shareMsg struct {
	Origin string  `json:"o"`
	Deltas []Delta `json:"d,omitempty"`
	// Until is a 429 penalty's end, in Unix nanoseconds.
	Until int64 `json:"u,omitempty"`
	// Pacing says the sender charged background calls since its last
	// message, so it shares the background pace.
	Pacing bool `json:"g,omitempty"`
}

// NewSharer turns sharing on for every deployment of b. prefix separates
// independent fleets on one NATS (tests); empty means "levee.capacity".
func NewSharer(nc *nats.Conn, b *Broker, prefix string, log *slog.Logger) *Sharer {
	if prefix == "" {
		prefix = "levee.capacity"
	}
	urgent := make(chan struct{}, 1)
	b.mu.Lock()
	b.shareUrgent = urgent
	for _, d := range b.Deployments() {
		d.Capacity.share(urgent)
	}
	b.mu.Unlock()
	return &Sharer{nc: nc, b: b, origin: uuid.NewString(), interval: 5 * time.Millisecond, log: log, prefix: prefix, urgent: urgent}
}

func (s *Sharer) subject(dep string) string {
	return s.prefix + "." + strings.NewReplacer(".", "_", "*", "_", ">", "_", " ", "_").Replace(dep)
}

// Run shares until ctx ends.
func (s *Sharer) Run(ctx context.Context) error {
	// Messages are handled one at a time, so the handler keeps its own
	// index of the deployments served, made again after a reload.
	var (
		served *routes
		byName map[string]*Deployment
	)
	sub, err := s.nc.Subscribe(s.prefix+".*", func(m *nats.Msg) {
		if r := s.b.r.Load(); r != served {
			served, byName = r, make(map[string]*Deployment, len(r.order))
			for _, d := range r.order {
				byName[s.subject(d.Name)] = d
			}
		}
		d := byName[m.Subject]
		if d == nil {
			return
		}
		var sm shareMsg
		if json.Unmarshal(m.Data, &sm) != nil || sm.Origin == s.origin {
			return
		}
		var until time.Time
		if sm.Until > 0 {
			until = time.Unix(0, sm.Until)
		}
		d.Capacity.apply(time.Now(), sm.Origin, sm.Deltas, until, sm.Pacing)
	})
	if err != nil {
		return fmt.Errorf("broker: share: %w", err)
	}
	defer sub.Unsubscribe()
	t := time.NewTicker(s.interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			s.flush()
			return nil
		case <-t.C:
			s.flush()
		case <-s.urgent:
			s.flush()
		}
	}
}

func (s *Sharer) flush() {
	for _, d := range s.b.Deployments() {
		ds, until, pacing := d.Capacity.drain()
		if len(ds) == 0 && until.IsZero() {
			continue
		}
		// Charges in the same bucket travel as one.
		merged := ds[:0]
		for _, x := range ds {
			if n := len(merged); n > 0 && merged[n-1].Bucket == x.Bucket {
				merged[n-1].Tokens += x.Tokens
				merged[n-1].Requests += x.Requests
				merged[n-1].SyncTokens += x.SyncTokens
				merged[n-1].SyncRequests += x.SyncRequests
				continue
			}
			merged = append(merged, x)
		}
		m := shareMsg{Origin: s.origin, Deltas: merged, Pacing: pacing}
		if !until.IsZero() {
			m.Until = until.UnixNano()
		}
		raw, _ := json.Marshal(m)
		if err := s.nc.Publish(s.subject(d.Name), raw); err != nil {
			s.log.Warn("sharing capacity", "deployment", d.Name, "err", err)
		}
	}
}
