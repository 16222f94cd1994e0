package broker

import (
	"net/http"
	"strconv"
	"strings"
	"time"
)

// RetryAfter reads how long a deployment asked us to wait: retry-after-ms
// first (Azure, OpenAI SDKs), then retry-after in seconds or as an HTTP date,
// then OpenAI's x-ratelimit-reset-tokens/-requests (Go-style durations). It
// returns 0 when the response gives no hint.
func RetryAfter(h http.Header, now time.Time) time.Duration {
	if v := h.Get("retry-after-ms"); v != "" {
		if ms, err := strconv.ParseFloat(strings.TrimSpace(v), 64); err == nil && ms > 0 {
			return time.Duration(ms * float64(time.Millisecond))
		}
	}
	if v := strings.TrimSpace(h.Get("retry-after")); v != "" {
		if s, err := strconv.ParseFloat(v, 64); err == nil && s > 0 {
			return time.Duration(s * float64(time.Second))
		}
		if t, err := http.ParseTime(v); err == nil && t.After(now) {
			return t.Sub(now)
		}
	}
	var d time.Duration
	for _, k := range []string{"x-ratelimit-reset-tokens", "x-ratelimit-reset-requests"} {
		if v := h.Get(k); v != "" {
			if r, err := time.ParseDuration(strings.TrimSpace(v)); err == nil && r > d {
				d = r
			}
		}
	}
	return d
}

// Remaining reads x-ratelimit-remaining-tokens and -requests; -1 where absent
// or unparsable.
func Remaining(h http.Header) (tokens, requests int64) {
	return headerInt(h, "x-ratelimit-remaining-tokens"), headerInt(h, "x-ratelimit-remaining-requests")
}

func headerInt(h http.Header, k string) int64 {
	v := h.Get(k)
	if v == "" {
		return -1
	}
	n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
	if err != nil || n < 0 {
		return -1
	}
	return n
}
