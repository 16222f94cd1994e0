// Package batch owns the life of an OpenAI-style batch: validating its input
// file's lines against the models and their policy, turning every line into
// a job at batch priority on the queue (so batches drain only into headroom,
// across every deployment that serves the model), and moving the batch
// through OpenAI's statuses as its jobs end — validating → in_progress →
// finalizing → completed, or failed, expired, cancelling → cancelled.
package batch

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/google/uuid"

	"github.com/levee-gw/levee/broker"
	"github.com/levee-gw/levee/queue"
	"github.com/levee-gw/levee/store"
	"github.com/levee-gw/levee/strictjson"
)

// Runner starts batches and moves them on.
type Runner struct {
	st  *store.Store
	q   *queue.Queue
	b   *broker.Broker
	log *slog.Logger
	// pin keeps lines naming a deployment on that deployment alone.
	pin bool
}

// New returns a Runner; pin is config's batches.pin_deployments.
func New(st *store.Store, q *queue.Queue, b *broker.Broker, pin bool, log *slog.Logger) *Runner {
	return &Runner{st: st, q: q, b: b, pin: pin, log: log}
}

// admit checks a line's body as any call is checked, and finds where it
// runs: an alias's group; or, for a deployment name, its model's group
// unless deployments are pinned (the policy is the same: a deployment is
// policed as its first alias).
func (r *Runner) admit(op broker.Op, body []byte) (*broker.Group, *broker.Request, error) {
	g, req, err := r.b.Admit(op, body, nil)
	if err != nil {
		return nil, nil, err
	}
	if _, isDeployment := r.b.Deployment(req.Model); isDeployment && !r.pin {
		if mg, ok := r.b.ModelGroup(req.Model); ok {
			g = mg
		}
	}
	return g, req, nil
}

// LineError is a validation problem of one input line (OpenAI's errors.data).
type LineError struct {
	Code    string  `json:"code"`
	Message string  `json:"message"`
	Param   *string `json:"param"`
	Line    *int    `json:"line"`
}

const maxLineErrors = 100

// Endpoint normalizes an endpoint or line URL (Azure lines omit /v1).
func Endpoint(u string) (broker.Op, string, bool) {
	op, ok := broker.OpFromPath(strings.TrimPrefix(strings.TrimPrefix(u, "/v1"), "/"))
	if !ok {
		return 0, "", false
	}
	return op, "/v1/" + op.Path(), true
}

// Start validates a batch's lines and, if they are all good, creates their
// jobs and publishes them; otherwise the batch fails with its line errors.
func (r *Runner) Start(ctx context.Context, b *store.Batch) error {
	op, endpoint, ok := Endpoint(b.Endpoint)
	if !ok {
		return r.fail(ctx, b, []LineError{{Code: "invalid_request", Message: "unsupported endpoint " + b.Endpoint}})
	}
	models := map[string]string{}
	var errs []LineError
	n := 0
	err := r.st.EachFileLine(ctx, b.InputFileID, func(fl *store.FileLine) error {
		n++
		line, body := fl.Line, fl.Body()
		if body == nil { // a file stored before bodies' places were kept
			var l struct {
				Body json.RawMessage `json:"body"`
			}
			if err := strictjson.Unmarshal(fl.Raw, &l); err != nil {
				errs = appendErr(errs, "invalid_json_line", "the line is not valid JSON", line)
				return nil
			}
			body = l.Body
		}
		g, req, err := r.admit(op, body)
		var um *broker.UnknownModelError
		switch {
		case errors.As(err, &um):
			errs = appendErr(errs, "model_not_found", fmt.Sprintf("model %q is not served by this gateway", um.Name), line)
			return nil
		case err != nil:
			errs = appendErr(errs, "invalid_request", err.Error(), line)
			return nil
		case req.Stream:
			errs = appendErr(errs, "invalid_request", "batch requests cannot stream", line)
			return nil
		case req.Background:
			errs = appendErr(errs, "invalid_request", "batch requests cannot be background responses: a batch already is", line)
			return nil
		case req.PreviousResponseID != "":
			// Lines run on whichever deployment has room; a conversation
			// is stored on one. (OpenAI's own Batch API has no state
			// either.)
			errs = appendErr(errs, "invalid_request", "batch requests cannot continue a stored response (previous_response_id)", line)
			return nil
		}
		models[req.Model] = g.Name
		return nil
	})
	if err != nil {
		return err
	}
	if n == 0 {
		errs = append(errs, LineError{Code: "empty_file", Message: "the input file has no requests"})
	}
	if len(errs) > 0 {
		return r.fail(ctx, b, errs)
	}
	ids, err := r.st.StartBatch(ctx, b, endpoint, models)
	if errors.Is(err, store.ErrJobTerminal) {
		return nil // started (or cancelled) elsewhere
	}
	if err != nil {
		return err
	}
	return r.publish(ctx, b, ids)
}

func appendErr(errs []LineError, code, msg string, line int) []LineError {
	if len(errs) >= maxLineErrors {
		return errs
	}
	l := line
	return append(errs, LineError{Code: code, Message: msg, Line: &l})
}

func (r *Runner) fail(ctx context.Context, b *store.Batch, errs []LineError) error {
	raw, _ := json.Marshal(map[string]any{"object": "list", "data": errs})
	return r.st.FailBatch(ctx, b, raw)
}

// publish puts the batch's jobs on the queue. Jobs whose publish is not
// confirmed stay unmarked, and the sweeper publishes them.
func (r *Runner) publish(ctx context.Context, b *store.Batch, ids []uuid.UUID) error {
	jobs, err := r.st.JobRefs(ctx, b.ID)
	if err != nil {
		return err
	}
	refs := make([]queue.JobRef, len(jobs))
	for i, j := range jobs {
		refs[i] = queue.JobRef{ID: j.ID, Priority: "batch", Model: j.Model, Tenant: b.TenantID}
	}
	// Whatever is not confirmed within the jobs' publish claim is left to
	// the outbox relays.
	pctx, cancel := context.WithTimeout(ctx, 50*time.Second)
	done, perr := r.q.PublishMany(pctx, refs)
	cancel()
	for start := 0; start < len(done); start += 5000 {
		if err := r.st.MarkPublished(ctx, done[start:min(start+5000, len(done))]...); err != nil {
			r.log.Warn("marking batch jobs published", "batch", b.ID, "err", err)
		}
	}
	if perr != nil {
		r.log.Warn("publishing batch jobs; the sweeper will finish", "batch", b.ID, "published", len(done), "of", len(ids), "err", perr)
	}
	return nil
}

// Run moves open batches on until ctx ends: it finishes batches whose jobs
// have all ended, expires batches past their window, completes cancels, and
// restarts batches left validating by a process that died.
func (r *Runner) Run(ctx context.Context) {
	t := time.NewTicker(500 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		batches, err := r.st.OpenBatches(ctx)
		if err != nil {
			continue
		}
		for _, b := range batches {
			if err := r.step(ctx, b); err != nil && ctx.Err() == nil {
				r.log.Warn("batch", "batch", b.ID, "err", err)
			}
		}
	}
}

func (r *Runner) step(ctx context.Context, b *store.Batch) error {
	switch b.Status {
	case "validating":
		if time.Since(b.CreatedAt) > time.Minute {
			return r.Start(ctx, b) // its starter died; starting is idempotent
		}
	case "in_progress":
		if time.Now().After(b.ExpiresAt) {
			if err := r.st.ExpireBatchLines(ctx, b.ID); err != nil {
				return err
			}
			if open, err := r.st.OpenBatchJobs(ctx, b.ID); err != nil || open > 0 {
				return err
			}
			_, err := r.st.EndBatch(ctx, b, []string{"in_progress"}, "expired")
			return err
		}
		if open, err := r.st.OpenBatchJobs(ctx, b.ID); err != nil || open > 0 {
			return err
		}
		if _, err := r.st.EndBatch(ctx, b, []string{"in_progress"}, "finalizing"); err != nil {
			return err
		}
		_, err := r.st.EndBatch(ctx, b, []string{"finalizing"}, "completed")
		return err
	case "finalizing":
		_, err := r.st.EndBatch(ctx, b, []string{"finalizing"}, "completed")
		return err
	case "cancelling":
		if open, err := r.st.OpenBatchJobs(ctx, b.ID); err != nil || open > 0 {
			return err
		}
		_, err := r.st.EndBatch(ctx, b, []string{"cancelling"}, "cancelled")
		return err
	}
	return nil
}
