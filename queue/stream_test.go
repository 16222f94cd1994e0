package queue_test

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"testing"

	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/queue"
)

// A brand-new stream is not news; a lost one holding queued jobs is.
func TestMissingStreamIsAWarningOnlyWhenJobsWereQueued(t *testing.T) {
	for _, tc := range []struct {
		name   string
		queued int64
		want   string
		not    string
	}{
		{"first start", 0, "level=INFO msg=\"created the jobs stream\"", "WARN"},
		{"stream lost with jobs queued", 7, "level=WARN msg=\"the jobs stream was missing and has been created; queued jobs will be published again\" jobs=7", "INFO"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n, err := dev.StartNATS(t.TempDir(), 0)
			if err != nil {
				t.Fatal(err)
			}
			defer n.Stop()
			var logs bytes.Buffer
			log := slog.New(slog.NewTextHandler(&logs, nil))
			q, err := queue.Open(context.Background(), queue.Config{URL: n.URL}, func() (int64, error) { return tc.queued, nil }, log)
			if err != nil {
				t.Fatal(err)
			}
			q.Close()
			if !strings.Contains(logs.String(), tc.want) || strings.Contains(logs.String(), tc.not) {
				t.Fatalf("logged:\n%s", logs.String())
			}
		})
	}
}
