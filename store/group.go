package store

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"
)

// groupCommit runs concurrent calls of one statement together (group
// commit). A call made while fewer than limit flushes are in flight is
// flushed at once, alone: light load pays no delay. A call made while limit
// flushes are in flight waits for one of them to end and then goes with
// every call that arrived meanwhile, up to max in one statement. So under
// load the round trip, the transaction and the index updates are shared,
// which is what makes thousands of jobs a second possible on a small
// Postgres; and the batch size follows the load by itself, with no timer.
type groupCommit[In, Out any] struct {
	// flush runs one statement for all of in and returns one Out per In.
	// An error fails the whole statement; each call is then flushed
	// alone, so one bad row cannot fail the others.
	flush func(ctx context.Context, in []In) ([]Out, error)
	// key, when set, names what a call acts on: two calls of one key never
	// share a statement (the second waits for the next), so a statement
	// never sees one row twice.
	key     func(In) any
	max     int
	limit   int
	timeout time.Duration

	mu       sync.Mutex
	pending  []*groupCall[In, Out]
	flushing int
}

type groupCall[In, Out any] struct {
	ctx  context.Context
	in   In
	out  Out
	err  error
	done chan struct{}
}

// do runs in (with others) and returns its result. A call whose ctx ends
// before its statement starts is not run; one whose statement has started
// waits for it, and a statement gives up at the earliest deadline of the
// calls in it (or g.timeout).
func (g *groupCommit[In, Out]) do(ctx context.Context, in In) (Out, error) {
	c := &groupCall[In, Out]{ctx: ctx, in: in, done: make(chan struct{})}
	g.mu.Lock()
	g.pending = append(g.pending, c)
	lead := g.flushing < g.limit
	if lead {
		g.flushing++
	}
	g.mu.Unlock()
	if lead {
		g.run(c)
	}
	select {
	case <-c.done:
		return c.out, c.err
	case <-ctx.Done():
	}
	g.mu.Lock()
	if i := slices.Index(g.pending, c); i >= 0 {
		g.pending = slices.Delete(g.pending, i, i+1)
		g.mu.Unlock()
		var zero Out
		return zero, ctx.Err()
	}
	g.mu.Unlock()
	<-c.done // its statement is running: it ends by this call's deadline
	return c.out, c.err
}

// run flushes pending calls until there are none. The caller that started it
// (own) does not stay to flush others' calls once its own is done: a new
// goroutine carries on, so no caller's latency is the whole queue's.
func (g *groupCommit[In, Out]) run(own *groupCall[In, Out]) {
	for {
		g.mu.Lock()
		n := min(len(g.pending), g.max)
		if n == 0 {
			g.flushing--
			g.mu.Unlock()
			return
		}
		batch := g.take(n)
		g.mu.Unlock()
		g.exec(batch)
		if own != nil {
			select {
			case <-own.done:
				go g.run(nil)
				return
			default:
			}
		}
	}
}

// take removes up to n calls from pending, in order, for one statement:
// with g.key set, a call whose key is already taken stays for the next.
// g.mu must be held.
func (g *groupCommit[In, Out]) take(n int) []*groupCall[In, Out] {
	batch := make([]*groupCall[In, Out], 0, n)
	var seen map[any]bool
	if g.key != nil {
		seen = make(map[any]bool, n)
	}
	rest := g.pending[:0]
	for _, c := range g.pending {
		if len(batch) < n && seen == nil {
			batch = append(batch, c)
			continue
		}
		if len(batch) < n && !seen[g.key(c.in)] {
			seen[g.key(c.in)] = true
			batch = append(batch, c)
			continue
		}
		rest = append(rest, c)
	}
	clear(g.pending[len(rest):])
	g.pending = rest
	if len(g.pending) == 0 {
		g.pending = nil
	}
	return batch
}

func (g *groupCommit[In, Out]) exec(all []*groupCall[In, Out]) {
	batch := all[:0:0]
	for _, c := range all {
		if err := c.ctx.Err(); err != nil {
			c.err = err // given up before its statement began
			close(c.done)
			continue
		}
		batch = append(batch, c)
	}
	if len(batch) == 0 {
		return
	}
	ctx, cancel := g.context(batch)
	defer cancel()
	in := make([]In, len(batch))
	for i, c := range batch {
		in[i] = c.in
	}
	out, err := g.flush(ctx, in)
	if err == nil && len(out) != len(batch) {
		err = fmt.Errorf("store: a grouped statement returned %d results for %d calls", len(out), len(batch))
	}
	if err == nil {
		for i, c := range batch {
			c.out = out[i]
			close(c.done)
		}
		return
	}
	if len(batch) == 1 {
		batch[0].err = err
		close(batch[0].done)
		return
	}
	for _, c := range batch {
		if cerr := c.ctx.Err(); cerr != nil {
			c.err = err
			close(c.done)
			continue
		}
		ctx, cancel := g.context([]*groupCall[In, Out]{c})
		out, err := g.flush(ctx, []In{c.in})
		cancel()
		switch {
		case err != nil:
			c.err = err
		case len(out) != 1:
			c.err = fmt.Errorf("store: a grouped statement returned %d results for 1 call", len(out))
		default:
			c.out = out[0]
		}
		close(c.done)
	}
}

// context is a statement's: not tied to any one caller's cancellation (the
// others still want it), but ending at the earliest of their deadlines.
func (g *groupCommit[In, Out]) context(batch []*groupCall[In, Out]) (context.Context, context.CancelFunc) {
	deadline := time.Now().Add(g.timeout)
	for _, c := range batch {
		if d, ok := c.ctx.Deadline(); ok && d.Before(deadline) {
			deadline = d
		}
	}
	return context.WithDeadline(context.Background(), deadline)
}

// Group commit sizing. groupMax bounds one statement's rows, and so its size
// in memory and its time holding locks. Claims and outcomes run one
// statement at a time in a process: the fewer in flight, the more rows each
// carries, and their rows (a job's, the daily rollup's) are locked only
// briefly. Inserts take two, so one tenant's insert waiting on its tenant's
// row (a deletion in progress) does not hold every tenant's submits. Measured
// with make bench-jobs (Postgres CPU per job, one job per request): 4 in
// flight 898 µs, 2 in flight 535 µs, 1 in flight 430 µs.
const (
	insertFlushes = 2
	groupFlushes  = 1
	groupMax      = 256
	groupTimeout  = 30 * time.Second
)
