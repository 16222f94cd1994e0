// Package outbox makes a job's acceptance durable before its message
// exists, and the message a certain consequence: the jobs table is
// JetStream's outbox. A job is accepted once its row is committed
// (queued, publish unconfirmed); the process that accepted it publishes it
// at once if NATS is there, briefly, and otherwise relays in every process
// publish it as soon as NATS is back — also when the accepting process
// died in between. The job id is the message id, so a job published twice
// inside JetStream's dedup window is one message.
package outbox

import (
	"context"
	"log/slog"
	"time"

	"github.com/google/uuid"

	"github.com/levee-gw/levee/queue"
	"github.com/levee-gw/levee/store"
)

// Store is the part of the store the relay uses.
type Store interface {
	ClaimUnpublished(ctx context.Context, limit int, claim time.Duration) ([]*store.Job, error)
	MarkPublished(ctx context.Context, ids ...uuid.UUID) error
	PublishEpoch() int64
	MarkPublishedSoon(id uuid.UUID, epoch int64)
}

// Publisher is the queue the relay feeds.
type Publisher interface {
	Connected() bool
	Publish(ctx context.Context, id uuid.UUID, priority, model string, tenant uuid.UUID) error
	PublishMany(ctx context.Context, jobs []queue.JobRef) ([]uuid.UUID, error)
}

// Timing of the hand-over between a job's own process and the relays.
const (
	// InlineClaim is how long a newly accepted job is left to the process
	// that accepted it before relays take it.
	InlineClaim = 2 * time.Second
	// inlineWait bounds the publish done while the client waits: a slow
	// or absent NATS costs a submit this much at most.
	inlineWait = 300 * time.Millisecond
	// relayClaim is how long a relay holds the jobs it took.
	relayClaim = 15 * time.Second
	relayBatch = 1000
	relayPoll  = 500 * time.Millisecond
)

// Relay publishes accepted jobs.
type Relay struct {
	st   Store
	q    Publisher
	log  *slog.Logger
	wake chan struct{}
}

// New returns a relay; run it with Run.
func New(st Store, q Publisher, log *slog.Logger) *Relay {
	return &Relay{st: st, q: q, log: log, wake: make(chan struct{}, 1)}
}

// Publish publishes a just-accepted job while its client waits, if NATS is
// connected, for at most inlineWait. It reports whether the message is
// confirmed; if not, relays publish it (the job is already durable).
func (r *Relay) Publish(ctx context.Context, j *store.Job) bool {
	if r.q.Connected() {
		epoch := r.st.PublishEpoch()
		pctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), inlineWait)
		err := r.q.Publish(pctx, j.ID, j.Priority, j.Model, j.TenantID)
		cancel()
		if err == nil {
			r.st.MarkPublishedSoon(j.ID, epoch)
			return true
		}
		r.log.Debug("publishing a job at once failed; relays will", "job", j.ID, "err", err)
	}
	r.Wake()
	return false
}

// PublishMany publishes just-accepted jobs together while their client
// waits, as Publish does one, and says how many are confirmed.
func (r *Relay) PublishMany(ctx context.Context, jobs []*store.Job) int {
	if !r.q.Connected() {
		r.Wake()
		return 0
	}
	refs := refsOf(jobs)
	epoch := r.st.PublishEpoch()
	pctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), inlineWait)
	done, err := r.q.PublishMany(pctx, refs)
	cancel()
	for _, id := range done {
		r.st.MarkPublishedSoon(id, epoch)
	}
	if err != nil {
		r.log.Debug("publishing jobs at once failed; relays will", "published", len(done), "of", len(jobs), "err", err)
		r.Wake()
	}
	return len(done)
}

// refsOf names jobs to publish.
func refsOf(jobs []*store.Job) []queue.JobRef {
	refs := make([]queue.JobRef, len(jobs))
	for i, j := range jobs {
		refs[i] = queue.JobRef{ID: j.ID, Priority: j.Priority, Model: j.Model, Tenant: j.TenantID}
	}
	return refs
}

// Wake makes the relay look for unpublished jobs now.
func (r *Relay) Wake() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// Run relays until ctx ends.
func (r *Relay) Run(ctx context.Context) {
	t := time.NewTicker(relayPoll)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-r.wake:
		}
		for ctx.Err() == nil && r.q.Connected() && r.relay(ctx) == relayBatch {
		}
	}
}

// relay publishes one claimed batch and says how many it claimed.
func (r *Relay) relay(ctx context.Context) int {
	jobs, err := r.st.ClaimUnpublished(ctx, relayBatch, relayClaim)
	if err != nil {
		if ctx.Err() == nil {
			r.log.Warn("outbox: claiming unpublished jobs", "err", err)
		}
		return 0
	}
	if len(jobs) == 0 {
		return 0
	}
	refs := refsOf(jobs)
	epoch := r.st.PublishEpoch()
	pctx, cancel := context.WithTimeout(ctx, relayClaim)
	done, perr := r.q.PublishMany(pctx, refs)
	cancel()
	// A stream lost meanwhile took these messages with it: no mark.
	if len(done) > 0 && r.st.PublishEpoch() == epoch {
		if err := r.st.MarkPublished(context.WithoutCancel(ctx), done...); err != nil {
			// Unmarked, they are published again after the claim: the
			// message id makes that harmless.
			r.log.Warn("outbox: marking jobs published", "err", err)
		}
	}
	if perr != nil {
		r.log.Warn("outbox: publishing jobs; will retry", "published", len(done), "of", len(jobs), "err", perr)
		return 0
	}
	r.log.Info("outbox: published jobs whose publish was not confirmed", "jobs", len(done))
	return len(jobs)
}
