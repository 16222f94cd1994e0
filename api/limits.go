package api

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
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
// a client that sends one line and stops is cut off, not waited for. And a
// request with Transfer-Encoding closes its connection after the response:
// Go's server drops a Content-Length sent beside it without a trace, and
// RFC 9112 §6.3 asks a server to close such a connection, which may be an
// attempt to smuggle a second request past a proxy; closing after every
// chunked request covers it at the price of one reconnect for such clients.
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
		r.Body = rr
		defer rr.done()
		return next(c)
	}
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
		r.done()
	}
	return n, err
}

// done lifts the deadline once the body is read (or the handler returns):
// net/http watches the connection for the client going away while the
// handler runs, and a deadline left behind would read as that.
func (r *rateReader) done() {
	if r.set && !r.failed {
		_ = r.rc.SetReadDeadline(time.Time{})
		r.set = false
	}
}

// uploadSlots caps each tenant's uploads in progress in this process: an
// upload holds a spool file and a goroutine while its client sends.
type uploadSlots struct {
	mu    sync.Mutex
	limit int
	busy  map[uuid.UUID]int
}

func newUploadSlots(limit int) *uploadSlots {
	return &uploadSlots{limit: limit, busy: map[uuid.UUID]int{}}
}

// take reserves a slot for tenant; release it when the upload ends.
func (u *uploadSlots) take(tenant uuid.UUID) (release func(), err error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.busy[tenant] >= u.limit {
		return nil, &Error{Status: http.StatusTooManyRequests, Type: "invalid_request_error", Code: "too_many_uploads",
			Message: fmt.Sprintf("This tenant already has %d uploads in progress; wait for one to finish.", u.limit), RetryAfter: time.Second}
	}
	u.busy[tenant]++
	return func() {
		u.mu.Lock()
		defer u.mu.Unlock()
		if u.busy[tenant]--; u.busy[tenant] <= 0 {
			delete(u.busy, tenant)
		}
	}, nil
}
