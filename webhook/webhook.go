// Package webhook owns outgoing webhooks (Standard Webhooks 1.0): secrets,
// signatures, the guard that keeps deliveries off private networks, and the
// sender that works through the Postgres outbox with retries on a schedule
// reaching a day, honouring Retry-After, disabling endpoints that answer 410.
package webhook

import (
	"bytes"
	"context"
	"crypto/hmac"
	crand "crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/levee-gw/levee/store"
)

// NewSecret returns a whsec_ secret of 32 random bytes.
func NewSecret() string {
	var b [32]byte
	_, _ = crand.Read(b[:])
	return "whsec_" + base64.StdEncoding.EncodeToString(b[:])
}

// ValidSecret reports whether s is a whsec_ secret of 24 to 64 bytes.
func ValidSecret(s string) bool {
	raw, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(s, "whsec_"))
	return strings.HasPrefix(s, "whsec_") && err == nil && len(raw) >= 24 && len(raw) <= 64
}

// Sign returns the webhook-signature header for a message: one v1 entry per
// secret (two during a rotation), space-separated.
func Sign(secrets []string, id string, ts time.Time, body []byte) string {
	var parts []string
	for _, s := range secrets {
		key, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(s, "whsec_"))
		if err != nil {
			continue
		}
		m := hmac.New(sha256.New, key)
		fmt.Fprintf(m, "%s.%d.", id, ts.Unix())
		m.Write(body)
		parts = append(parts, "v1,"+base64.StdEncoding.EncodeToString(m.Sum(nil)))
	}
	return strings.Join(parts, " ")
}

// DefaultSchedule is Standard Webhooks' suggested retry schedule: the delay
// before each retry, reaching a day after the first attempt.
var DefaultSchedule = []time.Duration{5 * time.Second, 5 * time.Minute, 30 * time.Minute, 2 * time.Hour, 5 * time.Hour,
	10 * time.Hour, 14 * time.Hour, 20 * time.Hour, 24 * time.Hour}

// Sender works through the outbox.
type Sender struct {
	st       *store.Store
	client   *http.Client
	schedule []time.Duration
	log      *slog.Logger
	poll     time.Duration
	attempts *prometheus.CounterVec
}

// NewSender returns a sender with the guard and retry schedule; reg (may be
// nil) gets its attempt counter.
func NewSender(st *store.Store, g Guard, schedule []time.Duration, reg prometheus.Registerer, log *slog.Logger) *Sender {
	if len(schedule) == 0 {
		schedule = DefaultSchedule
	}
	attempts := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "levee_webhook_attempts_total",
		Help: "Webhook delivery attempts, by outcome: delivered, retry (failed, will be tried again) or failed (given up)."}, []string{"outcome"})
	if reg != nil {
		reg.MustRegister(attempts)
	}
	return &Sender{st: st, client: g.Client(10 * time.Second), schedule: schedule, log: log, poll: 200 * time.Millisecond, attempts: attempts}
}

// Run delivers until ctx ends.
func (s *Sender) Run(ctx context.Context) {
	for ctx.Err() == nil {
		ds, err := s.st.ClaimDeliveries(ctx, 64, time.Minute)
		if err != nil || len(ds) == 0 {
			select {
			case <-ctx.Done():
			case <-time.After(s.poll):
			}
			continue
		}
		var wg sync.WaitGroup
		for _, d := range ds {
			wg.Add(1)
			go func() {
				defer wg.Done()
				s.deliver(ctx, d)
			}()
		}
		wg.Wait()
	}
}

// payload is the event body: the same bytes on every retry.
func payload(d *store.Delivery) []byte {
	return []byte(fmt.Sprintf(`{"id":"evt_%s","object":"event","type":%q,"created_at":%d,"data":%s}`,
		strings.ReplaceAll(d.EventID.String(), "-", ""), d.Type, d.EventAt.Unix(), d.Data))
}

// maxAttemptError bounds the error stored with a failed attempt.
const maxAttemptError = 512

func (s *Sender) deliver(ctx context.Context, d *store.Delivery) {
	body := payload(d)
	id := "evt_" + strings.ReplaceAll(d.EventID.String(), "-", "")
	now := time.Now()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, d.URL, bytes.NewReader(body))
	r := &store.AttemptResult{}
	if err == nil {
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("User-Agent", "Levee-Webhooks/1")
		req.Header.Set("webhook-id", id)
		req.Header.Set("webhook-timestamp", strconv.FormatInt(now.Unix(), 10))
		req.Header.Set("webhook-signature", Sign(d.Secrets, id, now, body))
		var resp *http.Response
		resp, err = s.client.Do(req)
		r.Duration = time.Since(now)
		if err == nil {
			_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
			resp.Body.Close()
			r.StatusCode = resp.StatusCode
			s.judge(d, resp, r)
		}
	}
	if err != nil {
		// The error may quote what the receiver sent (a malformed status
		// line): it is stored with the attempt, so it is bounded.
		r.Error = err.Error()
		if len(r.Error) > maxAttemptError {
			r.Error = strings.ToValidUTF8(r.Error[:maxAttemptError], "") + "…"
		}
		s.retry(d, 0, r)
		if errors.Is(err, ErrBlocked) {
			r.Outcome, r.Next = "failed", time.Now()
		}
	}
	if ctx.Err() != nil {
		return // shutting down: the lease lapses and the delivery is taken again
	}
	s.attempts.WithLabelValues(r.Outcome).Inc()
	if err := s.st.RecordAttempt(context.WithoutCancel(ctx), d, r); err != nil {
		s.log.Warn("recording webhook attempt", "delivery", d.ID, "err", err)
	}
}

func (s *Sender) judge(d *store.Delivery, resp *http.Response, r *store.AttemptResult) {
	switch {
	case resp.StatusCode >= 200 && resp.StatusCode < 300:
		r.Outcome, r.Next = "delivered", time.Now()
	case resp.StatusCode == http.StatusGone:
		r.Outcome, r.Next, r.DisableEndpoint = "failed", time.Now(), true
	default:
		// 3xx (not followed), 4xx and 5xx are failures; Retry-After can
		// only push the next attempt later.
		var after time.Duration
		if v := resp.Header.Get("Retry-After"); v != "" {
			if secs, err := strconv.Atoi(strings.TrimSpace(v)); err == nil && secs > 0 {
				after = time.Duration(secs) * time.Second
			} else if t, err := http.ParseTime(v); err == nil {
				after = time.Until(t)
			}
		}
		s.retry(d, after, r)
	}
}

// retry schedules the next attempt, jittered ±20 %, or gives up after the
// last step of the schedule.
func (s *Sender) retry(d *store.Delivery, atLeast time.Duration, r *store.AttemptResult) {
	if d.Attempts >= len(s.schedule) {
		r.Outcome, r.Next = "failed", time.Now()
		return
	}
	wait := time.Duration(float64(s.schedule[d.Attempts]) * (0.8 + 0.4*rand.Float64()))
	r.Outcome, r.Next = "retry", time.Now().Add(max(wait, atLeast))
}
