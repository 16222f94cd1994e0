package api

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/labstack/echo/v4"
)

// errBodyTooSlow ends a request whose body stopped arriving, or trickles in
// below the configured rate.
var errBodyTooSlow = errors.New("the request body arrived too slowly")

func bodyTooSlow() *Error {
	return &Error{Status: http.StatusRequestTimeout, Type: "invalid_request_error", Code: "request_timeout",
		Message: "The request body arrived too slowly; send it at a steady pace."}
}

// guardConnections bounds what one client can hold: its body must arrive
// within http.body_timeout plus one second per http.body_min_rate bytes, so
// a client that sends one line and stops is cut off, not waited for; and a
// response sent before the body was read to its end (a 401, a 405, a 413)
// closes the connection, so net/http does not wait, without a deadline, to
// drain a body that may never come. A request with Transfer-Encoding closes
// its connection too: Go's server drops a Content-Length sent beside it
// without a trace, and RFC 9112 §6.3 asks a server to close such a
// connection, which may be an attempt to smuggle a second request past a
// proxy; closing after every chunked request covers it at the price of one
// reconnect for such clients.
func (s *Server) guardConnections(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		r := c.Request()
		if len(r.TransferEncoding) > 0 {
			c.Response().Header().Set("Connection", "close")
		}
		if r.Body == nil || r.Body == http.NoBody || r.ContentLength == 0 {
			return next(c)
		}
		rr := &rateReader{ReadCloser: r.Body, rc: http.NewResponseController(c.Response().Writer), start: time.Now(),
			grace: s.cfg.HTTP.BodyTimeout, rate: s.cfg.HTTP.BodyMinRate}
		// The handler reads through a copy of the request: net/http keeps
		// its own body, and with it its handling of Expect: 100-continue.
		shadow := *r
		shadow.Body = rr
		c.SetRequest(&shadow)
		c.Response().Before(func() {
			if !rr.eof {
				c.Response().Header().Set("Connection", "close")
			}
		})
		c.Set(bodyContextKey, rr)
		err := next(c)
		rr.finish()
		return err
	}
}

const bodyContextKey = "levee.body"

// bounded gives a route that works on Postgres a deadline for it: a
// database that stops answering (a frozen primary, a failover) gets the
// client a 503 after database_timeout, not a hang that holds a connection
// and a goroutine. The clock starts once the request's body has arrived,
// so a slow client is not charged for its own pace.
func (s *Server) bounded(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		parent := c.Request().Context()
		var cancel context.CancelFunc = func() {}
		arm := func() {
			var ctx context.Context
			ctx, cancel = context.WithTimeout(parent, s.cfg.DatabaseTimeout)
			c.SetRequest(c.Request().WithContext(ctx))
		}
		if rr, ok := c.Get(bodyContextKey).(*rateReader); ok && !rr.eof {
			rr.onEOF = arm
		} else {
			arm()
		}
		defer func() { cancel() }()
		return next(c)
	}
}

// dbContext bounds one wait on Postgres outside a bounded route.
func (s *Server) dbContext(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, s.cfg.DatabaseTimeout)
}

// rateReader enforces the body's pace with the connection's read deadline,
// so even a Read blocked on a silent client returns in time.
type rateReader struct {
	io.ReadCloser
	rc     *http.ResponseController
	start  time.Time
	grace  time.Duration
	rate   int64
	n      int64
	set    bool
	failed bool
	eof    bool
	// onEOF runs once the body has arrived whole.
	onEOF func()
}

func (r *rateReader) Read(p []byte) (int, error) {
	if r.failed {
		return 0, errBodyTooSlow
	}
	// Allowed: the grace, then one second per rate bytes, counting this
	// read in full so a large buffer does not need the deadline moved.
	allowed := r.grace + time.Duration(float64(r.n+int64(len(p)))/float64(r.rate)*float64(time.Second))
	if err := r.rc.SetReadDeadline(r.start.Add(allowed)); err == nil {
		r.set = true
	}
	n, err := r.ReadCloser.Read(p)
	r.n += int64(n)
	if err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
		r.failed = true
		return n, errBodyTooSlow
	}
	if err != nil {
		r.eof = errors.Is(err, io.EOF)
		r.done()
		if r.eof && r.onEOF != nil {
			r.onEOF()
			r.onEOF = nil
		}
	}
	return n, err
}

// done lifts the deadline once the body is read: net/http watches the
// connection for the client going away while the handler runs, and a
// deadline left behind would read as that.
func (r *rateReader) done() {
	if r.set && !r.failed {
		_ = r.rc.SetReadDeadline(time.Time{})
		r.set = false
	}
}

// finish runs when the handler returns. A body not read to its end is not
// waited for: net/http would read up to 256 KiB of it, without a deadline,
// before closing the connection, so the deadline is set to now and the
// connection closes (the response says so) instead.
func (r *rateReader) finish() {
	if r.eof || r.failed {
		r.done()
		return
	}
	_ = r.rc.SetReadDeadline(time.Now())
}

// uploadSlots caps each tenant's uploads in progress in this process, and
// all of them: an upload holds a spool file of up to 200 MB and a goroutine
// while its client sends.
type uploadSlots struct {
	mu        sync.Mutex
	perTenant int
	limit     int
	total     int
	busy      map[uuid.UUID]int
	dir       string
}

// spoolAge is how old a spool file left in the spool directory must be
// before it is taken for a crashed process's and removed.
const spoolAge = 24 * time.Hour

func newUploadSlots(perTenant, limit int, log *slog.Logger) *uploadSlots {
	u := &uploadSlots{perTenant: perTenant, limit: limit, busy: map[uuid.UUID]int{}, dir: filepath.Join(os.TempDir(), "levee-uploads")}
	if err := os.MkdirAll(u.dir, 0o700); err != nil {
		log.Warn("upload spool directory", "dir", u.dir, "err", err)
		u.dir = os.TempDir()
	}
	// Spool files of a process that died mid-upload are not anyone's.
	entries, _ := os.ReadDir(u.dir)
	for _, e := range entries {
		if info, err := e.Info(); err == nil && !e.IsDir() && time.Since(info.ModTime()) > spoolAge {
			_ = os.Remove(filepath.Join(u.dir, e.Name()))
		}
	}
	return u
}

// take reserves a slot for tenant; release it when the upload ends.
func (u *uploadSlots) take(tenant uuid.UUID) (release func(), err error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	switch {
	case u.busy[tenant] >= u.perTenant:
		return nil, &Error{Status: http.StatusTooManyRequests, Type: "invalid_request_error", Code: "too_many_uploads",
			Message: fmt.Sprintf("This tenant already has %d uploads in progress; wait for one to finish.", u.perTenant), RetryAfter: time.Second}
	case u.total >= u.limit:
		return nil, &Error{Status: http.StatusTooManyRequests, Type: "invalid_request_error", Code: "too_many_uploads",
			Message: "This gateway has as many uploads in progress as it takes; retry shortly.", RetryAfter: time.Second}
	}
	u.busy[tenant]++
	u.total++
	return func() {
		u.mu.Lock()
		defer u.mu.Unlock()
		u.total--
		if u.busy[tenant]--; u.busy[tenant] <= 0 {
			delete(u.busy, tenant)
		}
	}, nil
}
