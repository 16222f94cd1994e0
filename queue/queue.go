// Package queue owns Levee's use of NATS JetStream: the jobs stream, its
// subjects (levee.jobs.<priority>.<model>.<tenant>), one durable pull
// consumer per (priority, model, tenant) so workers can serve tenants in
// turn, and publishing with the job id as Nats-Msg-Id so a retried publish
// never duplicates a job. It also carries the core-NATS notices that tell a
// waiting caller its job is done.
package queue

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/levee-gw/levee/tracing"
)

// Priorities, highest first. Synchronous calls ("high") never enter the queue.
var Priorities = []string{"normal", "low", "batch"}

// Config tunes the connection, the stream and consumers.
type Config struct {
	// URL is one server's URL or several, comma separated; it may carry a
	// user and password or a token.
	URL string
	// Creds is a .creds file (a user JWT and its nkey seed).
	Creds string
	// TLS secures the connection when Enabled.
	TLS TLS
	// Domain is the JetStream domain of the stream ("" for the local one).
	Domain string
	// Stream is the stream's name (tests use their own).
	Stream   string
	Replicas int
	// AckWait is how long a worker may hold a message without a sign of life.
	AckWait time.Duration
	// MaxAckPending caps one tenant's in-flight messages per priority and model.
	MaxAckPending int
	// Duplicates is the dedup window for Nats-Msg-Id.
	Duplicates time.Duration
	// ConsumerIdle is how long an unused consumer lives (default 1 h).
	ConsumerIdle time.Duration
	// Tracer, when set, puts the publisher's trace context in each job's
	// message headers, for the worker's span to link to.
	Tracer *tracing.Tracer
}

func (c *Config) defaults() {
	if c.Stream == "" {
		c.Stream = "LEVEE_JOBS"
	}
	if c.Replicas == 0 {
		c.Replicas = 1
	}
	if c.AckWait == 0 {
		c.AckWait = 30 * time.Second
	}
	if c.MaxAckPending == 0 {
		c.MaxAckPending = 256
	}
	if c.Duplicates == 0 {
		c.Duplicates = 10 * time.Minute
	}
	if c.ConsumerIdle == 0 {
		c.ConsumerIdle = time.Hour
	}
}

// TLS names the files of a TLS connection. The client reads them at each
// (re)connect, so renewed certificates are used without a restart.
type TLS struct {
	// CAFile verifies the servers (default: the system's roots).
	CAFile string
	// CertFile and KeyFile are a client certificate (mutual TLS).
	CertFile, KeyFile string
	// ServerName overrides the name expected in the servers' certificates.
	ServerName string
}

// Enabled reports whether any TLS setting is given.
func (t TLS) Enabled() bool { return t != TLS{} }

// options are the connection's credentials and TLS settings.
func (c *Config) options() []nats.Option {
	var opts []nats.Option
	if c.Creds != "" {
		opts = append(opts, nats.UserCredentials(c.Creds))
	}
	if c.TLS.Enabled() {
		// Secure first: RootCAs and ClientCert keep the config it sets.
		opts = append(opts, nats.Secure(&tls.Config{ServerName: c.TLS.ServerName, MinVersion: tls.VersionTLS12}))
		if c.TLS.CAFile != "" {
			opts = append(opts, nats.RootCAs(c.TLS.CAFile))
		}
		if c.TLS.CertFile != "" {
			opts = append(opts, nats.ClientCert(c.TLS.CertFile, c.TLS.KeyFile))
		}
	}
	return opts
}

// clusterStarting reports an error a JetStream cluster gives while it
// comes up: requests unanswered, or answered that there are not yet the
// peers to place the stream on (10005) or that the system is not yet
// available (10008).
func clusterStarting(err error) bool {
	var api *jetstream.APIError
	if errors.As(err, &api) {
		return api.ErrorCode == 10005 || api.ErrorCode == 10008
	}
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout)
}

// maxConsumers is the jobs stream's consumer limit: high enough never to be
// what bounds the tenants with queued work (consumer_idle removes the idle
// ones), and set, because a stream that sets none gets the server's default.
const maxConsumers = 1_000_000

// startupWait bounds how long Open waits for JetStream to answer at all.
const startupWait = 30 * time.Second

// Queue is a connection to the jobs stream.
type Queue struct {
	cfg    Config
	nc     *nats.Conn
	js     jetstream.JetStream
	prefix string
	log    *slog.Logger

	mu        sync.Mutex
	consumers map[string]jetstream.Consumer
	stream    jetstream.Stream // for Pending, once looked up
	onLost    func() (int64, error)
}

// Open connects (reconnecting forever) and creates or updates the stream.
// onLost, if set, is called whenever the stream had to be created: at start
// or after a reconnect, JetStream no longer had it, so messages of jobs
// accepted earlier may be gone and must be published again. It returns how
// many queued jobs it will publish again.
func Open(ctx context.Context, cfg Config, onLost func() (int64, error), log *slog.Logger) (*Queue, error) {
	cfg.defaults()
	var q *Queue
	// Logs name servers by their server_name, never by URL: a URL may
	// carry a password.
	opts := append(cfg.options(), nats.Name("levee"), nats.MaxReconnects(-1), nats.ReconnectWait(250*time.Millisecond),
		nats.RetryOnFailedConnect(false),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil { // nil: Levee closed it
				log.Warn("lost the connection to NATS; reconnecting", "err", err)
			}
		}),
		// Without a handler the client drops asynchronous errors silently,
		// and a permission missing on a subject would go unnoticed.
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			if sub != nil {
				log.Warn("NATS", "subject", sub.Subject, "err", err)
				return
			}
			log.Warn("NATS", "err", err)
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			log.Info("reconnected to NATS", "server", nc.ConnectedServerName())
			if q == nil {
				return
			}
			go func() {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				if err := q.ensureStream(ctx); err != nil {
					log.Warn("checking the jobs stream after a reconnect", "err", err)
				}
			}()
		}))
	// The URL is not in the error: it may carry a password.
	nc, err := nats.Connect(cfg.URL, opts...)
	if err != nil {
		return nil, fmt.Errorf("queue: connect to NATS: %w", err)
	}
	var js jetstream.JetStream
	if cfg.Domain != "" {
		js, err = jetstream.NewWithDomain(nc, cfg.Domain)
	} else {
		js, err = jetstream.New(nc)
	}
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("queue: %w", err)
	}
	q = &Queue{cfg: cfg, nc: nc, js: js, log: log, consumers: map[string]jetstream.Consumer{},
		prefix: "levee.jobs." + strings.ToLower(cfg.Stream), onLost: onLost}
	// A cluster that has just started may take some seconds to elect the
	// leader that creates streams; its requests time out meanwhile. Other
	// errors (no JetStream, no permission) will not pass by waiting.
	for wait := time.Now().Add(startupWait); ; {
		err := q.ensureStream(ctx)
		if err == nil {
			return q, nil
		}
		if !clusterStarting(err) || time.Now().After(wait) || ctx.Err() != nil {
			nc.Close()
			return nil, err
		}
		log.Warn("JetStream is not answering yet; trying again", "err", err)
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

func (q *Queue) ensureStream(ctx context.Context) error {
	want := jetstream.StreamConfig{
		Name:        q.cfg.Stream,
		Description: "Levee jobs: one message per queued job, carrying its id",
		Subjects:    []string{q.prefix + ".>"},
		Retention:   jetstream.WorkQueuePolicy,
		Storage:     jetstream.FileStorage,
		Replicas:    q.cfg.Replicas,
		Duplicates:  q.cfg.Duplicates,
		// One consumer per (priority, model, tenant) with work: the
		// server's default limit (1,000 per stream unless the stream or
		// the account sets one) would leave the 1,001st tenant's jobs
		// queued forever. An account limit, if the operator sets one,
		// still applies.
		MaxConsumers: maxConsumers,
	}
	s, err := q.js.Stream(ctx, q.cfg.Stream)
	missing := errors.Is(err, jetstream.ErrStreamNotFound)
	if err != nil && !missing {
		return fmt.Errorf("queue: stream %s: %w", q.cfg.Stream, err)
	}
	// Every process checks the stream at start and after each reconnect;
	// one that is as wanted is left alone (an update per process after a
	// NATS restart would only churn the server's metadata).
	if !missing {
		have := s.CachedInfo().Config
		if have.Description == want.Description && slices.Equal(have.Subjects, want.Subjects) && have.Retention == want.Retention &&
			have.Storage == want.Storage && have.Replicas == want.Replicas && have.Duplicates == want.Duplicates &&
			have.MaxConsumers == want.MaxConsumers {
			return nil
		}
	}
	_, err = q.js.CreateOrUpdateStream(ctx, want)
	if err != nil {
		return fmt.Errorf("queue: stream %s: %w", q.cfg.Stream, err)
	}
	if missing {
		// Consumers went with the stream; forget the cached handles.
		q.mu.Lock()
		clear(q.consumers)
		q.mu.Unlock()
		if q.onLost != nil {
			// A brand-new stream is missing too; only queued jobs make its
			// absence a loss worth an operator's attention.
			switch n, err := q.onLost(); {
			case err != nil:
				q.log.Error("the jobs stream was missing and has been created; marking queued jobs for publishing again failed", "err", err)
			case n > 0:
				q.log.Warn("the jobs stream was missing and has been created; queued jobs will be published again", "jobs", n)
			default:
				q.log.Info("created the jobs stream", "stream", q.cfg.Stream)
			}
		}
	}
	return nil
}

// Connected reports whether the NATS connection is up now.
func (q *Queue) Connected() bool { return q.nc.IsConnected() }

// Conn is the NATS connection (capacity sharing and notices use it too).
func (q *Queue) Conn() *nats.Conn { return q.nc }

// Close drains the connection.
func (q *Queue) Close() { q.nc.Close() }

// Token makes a name safe as one subject token and as part of a consumer
// name: anything outside [A-Za-z0-9_-] becomes '_'.
func Token(s string) string {
	b := []byte(s)
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-') {
			b[i] = '_'
		}
	}
	return string(b)
}

// MaxAckPending is how many messages one consumer may have unanswered.
func (q *Queue) MaxAckPending() int { return q.cfg.MaxAckPending }

// Subject is where a job of this priority, model and tenant is published.
func (q *Queue) Subject(priority, model string, tenant uuid.UUID) string {
	return q.prefix + "." + priority + "." + Token(model) + "." + tenant.String()
}

// ParseSubject splits a job subject into its priority, model token and tenant.
func (q *Queue) ParseSubject(subject string) (priority, modelToken string, tenant uuid.UUID, ok bool) {
	rest, found := strings.CutPrefix(subject, q.prefix+".")
	if !found {
		return "", "", uuid.Nil, false
	}
	parts := strings.Split(rest, ".")
	if len(parts) != 3 {
		return "", "", uuid.Nil, false
	}
	t, err := uuid.Parse(parts[2])
	if err != nil {
		return "", "", uuid.Nil, false
	}
	return parts[0], parts[1], t, true
}

// ErrUnavailable means JetStream could not take the message now.
var ErrUnavailable = errors.New("the job queue is unavailable")

// Publish puts a job on the stream. The job id is the message id, so a
// retried publish (or a sweeper's republish) inside the dedup window is
// dropped by JetStream itself.
func (q *Queue) Publish(ctx context.Context, id uuid.UUID, priority, model string, tenant uuid.UUID) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	msg := &nats.Msg{Subject: q.Subject(priority, model, tenant), Data: []byte(id.String()), Header: q.traceHeader(ctx)}
	_, err := q.js.PublishMsg(ctx, msg, jetstream.WithMsgID(id.String()))
	if err != nil {
		return fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	return nil
}

// traceHeader is the message headers carrying ctx's trace context (nil
// when not tracing, or ctx holds none).
func (q *Queue) traceHeader(ctx context.Context) nats.Header {
	if q.cfg.Tracer == nil {
		return nil
	}
	h := http.Header{}
	q.cfg.Tracer.Inject(ctx, h)
	if len(h) == 0 {
		return nil
	}
	return nats.Header(h)
}

// TraceHeader is a message's headers, to read a trace context from.
func TraceHeader(m jetstream.Msg) http.Header { return http.Header(m.Headers()) }

// Consumer returns (creating if needed) the durable consumer of one
// priority, model and tenant.
func (q *Queue) Consumer(ctx context.Context, priority, modelToken string, tenant uuid.UUID) (jetstream.Consumer, error) {
	name := q.consumerName(priority, modelToken, tenant)
	q.mu.Lock()
	c, ok := q.consumers[name]
	q.mu.Unlock()
	if ok {
		return c, nil
	}
	c, err := q.js.CreateOrUpdateConsumer(ctx, q.cfg.Stream, jetstream.ConsumerConfig{
		Durable:       name,
		FilterSubject: q.prefix + "." + priority + "." + modelToken + "." + tenant.String(),
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       q.cfg.AckWait,
		MaxAckPending: q.cfg.MaxAckPending,
		// Levee counts attempts in Postgres and ends the job itself; the
		// server must never silently drop a message.
		MaxDeliver: -1,
		// An idle consumer goes; its handle then fails to fetch, is
		// forgotten, and the next job creates the consumer again. A
		// message a worker still held is redelivered to the new one, and
		// Postgres (a job ends once) makes that harmless.
		InactiveThreshold: q.cfg.ConsumerIdle,
	})
	if err != nil {
		return nil, fmt.Errorf("queue: consumer %s: %w", name, err)
	}
	q.mu.Lock()
	q.consumers[name] = c
	q.mu.Unlock()
	return c, nil
}

// Forget drops a cached consumer handle (after a failed fetch), so it is
// created again on next use.
func (q *Queue) Forget(priority, modelToken string, tenant uuid.UUID) {
	q.mu.Lock()
	delete(q.consumers, q.consumerName(priority, modelToken, tenant))
	q.mu.Unlock()
}

func (q *Queue) consumerName(priority, modelToken string, tenant uuid.UUID) string {
	return Token(strings.ToLower(q.cfg.Stream)) + "_" + priority + "_" + modelToken + "_" + tenant.String()
}

// pendingTimeout bounds Pending; the stream answers in milliseconds.
const pendingTimeout = time.Second

// Pending returns the stream's message count per subject: the jobs waiting
// or in flight for each priority, model and tenant.
func (q *Queue) Pending(ctx context.Context) (map[string]uint64, error) {
	// Workers wait on this before each turn. A request that reached a
	// stream leader as it died is never answered: a second, not the
	// client's default five, is what it may cost them.
	ctx, cancel := context.WithTimeout(ctx, pendingTimeout)
	defer cancel()
	// The stream's handle is kept: getting one is a round trip of its own
	// (a stream info without subjects), on every dispatch pass. A handle
	// is only the stream's name, so it stays good if the stream is made
	// again.
	q.mu.Lock()
	s := q.stream
	q.mu.Unlock()
	if s == nil {
		var err error
		if s, err = q.js.Stream(ctx, q.cfg.Stream); err != nil {
			return nil, err
		}
		q.mu.Lock()
		q.stream = s
		q.mu.Unlock()
	}
	info, err := s.Info(ctx, jetstream.WithSubjectFilter(q.prefix+".>"))
	if err != nil {
		return nil, err
	}
	return info.State.Subjects, nil
}

// Ready reports whether JetStream answers.
func (q *Queue) Ready(ctx context.Context) error {
	_, err := q.js.AccountInfo(ctx)
	return err
}

func (q *Queue) doneSubject(id uuid.UUID) string { return "levee.done." + id.String() }

// cancelSubject carries the ids of cancelled jobs to every worker process.
const cancelSubject = "levee.cancelled"

// NotifyCancelled tells the worker running a job that it was cancelled, so
// it stops the upstream call (best effort: workers also notice when they
// next extend the job's lease).
func (q *Queue) NotifyCancelled(id uuid.UUID) {
	_ = q.nc.Publish(cancelSubject, []byte(id.String()))
}

// OnCancelled calls f with the id of every job cancelled from now on, until
// stop is called.
func (q *Queue) OnCancelled(f func(uuid.UUID)) (stop func(), err error) {
	sub, err := q.nc.Subscribe(cancelSubject, func(m *nats.Msg) {
		if id, err := uuid.ParseBytes(m.Data); err == nil {
			f(id)
		}
	})
	if err != nil {
		return nil, fmt.Errorf("queue: subscribe to cancellations: %w", err)
	}
	return func() { _ = sub.Unsubscribe() }, nil
}

// NotifyDone tells waiting callers a job ended (best effort: they also poll).
func (q *Queue) NotifyDone(id uuid.UUID) {
	_ = q.nc.Publish(q.doneSubject(id), nil)
}

// WaitDone subscribes to a job's end notice; wait returns when it arrives,
// when every tick elapses (so the caller re-checks Postgres), or ctx ends.
func (q *Queue) WaitDone(id uuid.UUID) (wait func(ctx context.Context, tick time.Duration) bool, stop func(), err error) {
	sub, err := q.nc.SubscribeSync(q.doneSubject(id))
	if err != nil {
		return nil, nil, err
	}
	wait = func(ctx context.Context, tick time.Duration) bool {
		ctx, cancel := context.WithTimeout(ctx, tick)
		defer cancel()
		_, err := sub.NextMsgWithContext(ctx)
		return err == nil
	}
	return wait, func() { _ = sub.Unsubscribe() }, nil
}

// JobRef names a job to publish.
type JobRef struct {
	ID       uuid.UUID
	Priority string
	Model    string
	Tenant   uuid.UUID
}

// PublishMany publishes jobs asynchronously, a window at a time, and waits
// for JetStream to acknowledge each. It returns the ids acknowledged; any
// other is left for the sweeper (the message id keeps a republish single).
func (q *Queue) PublishMany(ctx context.Context, jobs []JobRef) ([]uuid.UUID, error) {
	const window = 2048
	var done []uuid.UUID
	h := q.traceHeader(ctx)
	for start := 0; start < len(jobs); start += window {
		part := jobs[start:min(start+window, len(jobs))]
		futures := make([]jetstream.PubAckFuture, len(part))
		for i, j := range part {
			// Each message its own header map: WithMsgID writes its id
			// into it, and an async publish may be retried from it.
			msg := &nats.Msg{Subject: q.Subject(j.Priority, j.Model, j.Tenant), Data: []byte(j.ID.String())}
			if h != nil {
				msg.Header = maps.Clone(h)
			}
			f, err := q.js.PublishMsgAsync(msg, jetstream.WithMsgID(j.ID.String()))
			if err != nil {
				return done, fmt.Errorf("%w: %v", ErrUnavailable, err)
			}
			futures[i] = f
		}
		for i, f := range futures {
			select {
			case <-f.Ok():
				done = append(done, part[i].ID)
			case err := <-f.Err():
				return done, fmt.Errorf("%w: %v", ErrUnavailable, err)
			case <-ctx.Done():
				return done, ctx.Err()
			}
		}
	}
	return done, nil
}
