package queue_test

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/nats-io/nats-server/v2/server"

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

// lockedBuffer is a log the client's callback goroutine may write to.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// A subject Levee may not publish to is logged (the client would otherwise
// drop the server's complaint silently), and the password it connected
// with is not.
func TestAMissingPermissionIsLogged(t *testing.T) {
	const password = "s3cret-pa55"
	n, err := dev.StartNATSServer(&server.Options{Host: "127.0.0.1", Port: server.RANDOM_PORT, JetStream: true, StoreDir: t.TempDir(), NoLog: true,
		Users: []*server.User{{Username: "levee", Password: password, Permissions: &server.Permissions{
			Publish:   &server.SubjectPermission{Allow: []string{"$JS.API.>"}},
			Subscribe: &server.SubjectPermission{Allow: []string{"_INBOX.>"}}}}}})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Stop()
	var logs lockedBuffer
	url := "nats://levee:" + password + "@" + strings.TrimPrefix(n.URL, "nats://")
	q, err := queue.Open(context.Background(), queue.Config{URL: url}, nil, slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	q.NotifyCancelled(uuid.New())
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(logs.String(), `Permissions Violation for Publish to \"levee.cancelled\"`) {
		if time.Now().After(deadline) {
			t.Fatalf("logged:\n%s", logs.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if strings.Contains(logs.String(), password) {
		t.Fatalf("the password was logged:\n%s", logs.String())
	}
}

// A process that starts while its JetStream cluster has no quorum yet (a
// fresh cluster electing, or nodes still coming up) waits for it instead of
// exiting on the first timeout.
func TestOpenWaitsForAClusterWithoutQuorum(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a NATS cluster")
	}
	c, err := dev.StartNATSCluster(context.Background(), t.TempDir(), 3)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Stop()
	c.StopNode(1)
	c.StopNode(2)
	go func() {
		time.Sleep(3 * time.Second)
		_ = c.StartNode(1)
		_ = c.StartNode(2)
	}()
	var logs bytes.Buffer
	start := time.Now()
	q, err := queue.Open(context.Background(), queue.Config{URL: c.URL, Replicas: 3}, nil, slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatalf("Open gave up after %v: %v\n%s", time.Since(start), err, logs.String())
	}
	defer q.Close()
	if time.Since(start) < 2*time.Second {
		t.Fatalf("Open returned after %v, before the cluster had a quorum: the test proves nothing", time.Since(start))
	}
	if !strings.Contains(logs.String(), "JetStream is not answering yet") {
		t.Fatalf("the wait was not logged:\n%s", logs.String())
	}
}
