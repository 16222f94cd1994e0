package test

import (
	"bufio"
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/gateway"
	"github.com/levee-gw/levee/test/harness"
)

// reviewGateway starts a second gateway on env's Postgres and NATS whose
// deployments all point at h (a fake deployment), with workers if asked.
func reviewGateway(t *testing.T, env *harness.Env, h http.Handler, workers bool, edit func(*config.Config)) *gateway.Gateway {
	t.Helper()
	return gatewayOver(t, env, h, workers, edit)
}

// sseEvent is one server-sent event as a client reads it.
type sseEvent struct {
	Type string
	Data map[string]any
}

// openStream posts (or gets) and returns the response, for reading events
// with readEvents; cancel closes it.
func openStream(t *testing.T, method, url, key string, body any) (*http.Response, context.CancelFunc) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var rd *strings.Reader
	if body != nil {
		raw, _ := json.Marshal(body)
		rd = strings.NewReader(string(raw))
	}
	var req *http.Request
	var err error
	if rd != nil {
		req, err = http.NewRequestWithContext(ctx, method, url, rd)
	} else {
		req, err = http.NewRequestWithContext(ctx, method, url, nil)
	}
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+key)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	return resp, func() { cancel(); resp.Body.Close() }
}

// readEvents calls fn with each event until the stream ends or fn says stop.
func readEvents(resp *http.Response, fn func(sseEvent) bool) error {
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	var ev sseEvent
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "event: "):
			ev.Type = strings.TrimPrefix(line, "event: ")
		case strings.HasPrefix(line, "data: "):
			ev.Data = nil
			_ = json.Unmarshal([]byte(strings.TrimPrefix(line, "data: ")), &ev.Data)
		case line == "":
			if ev.Type != "" || ev.Data != nil {
				if !fn(ev) {
					return nil
				}
			}
			ev = sseEvent{}
		}
	}
	return sc.Err()
}
