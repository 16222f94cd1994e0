package harness

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/levee-gw/levee/dev"
)

// Cluster is a NATS JetStream cluster of one test's own (dev.NATSCluster),
// with a client of its own to watch where streams are led.
type Cluster struct {
	*dev.NATSCluster
	t  testing.TB
	js jetstream.JetStream
}

// StartCluster starts a cluster of size nodes, waits until JetStream is
// ready on it, and stops it at cleanup. Start it before the stack that
// uses it, so it is stopped after.
func StartCluster(t testing.TB, size int) *Cluster {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := dev.StartNATSCluster(ctx, t.TempDir(), size)
	if err != nil {
		t.Fatalf("harness: %v", err)
	}
	t.Cleanup(c.Stop)
	nc, err := nats.Connect(c.URL, nats.Name("harness"), nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond))
	if err != nil {
		t.Fatalf("harness: %v", err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatalf("harness: %v", err)
	}
	// JetStream is ready when it answers for the account, not merely when
	// the servers say a meta leader exists.
	Eventually(t, 30*time.Second, "JetStream to answer on the cluster", func() bool {
		actx, acancel := context.WithTimeout(ctx, time.Second)
		defer acancel()
		_, err := js.AccountInfo(actx)
		return err == nil
	})
	return &Cluster{NATSCluster: c, t: t, js: js}
}

// Kill stops node i.
func (c *Cluster) Kill(i int) { c.StopNode(i) }

// Start starts node i again on its ports and storage and waits until it is
// back in the cluster, current with the meta leader.
func (c *Cluster) Start(i int) {
	c.t.Helper()
	if err := c.StartNode(i); err != nil {
		c.t.Fatalf("harness: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := c.WaitReady(ctx); err != nil {
		c.t.Fatalf("harness: %v", err)
	}
}

// StreamInfo is a stream's info now, from whichever node answers.
func (c *Cluster) StreamInfo(stream string) (*jetstream.StreamInfo, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	s, err := c.js.Stream(ctx, stream)
	if err != nil {
		return nil, err
	}
	return s.Info(ctx)
}

// StreamLeader is the node leading a stream now, -1 if none does.
func (c *Cluster) StreamLeader(stream string) int {
	info, err := c.StreamInfo(stream)
	if err != nil || info.Cluster == nil {
		return -1
	}
	return c.Index(info.Cluster.Leader)
}

// WaitStreamLeader waits until a node other than old leads the stream and
// returns it.
func (c *Cluster) WaitStreamLeader(stream string, old int, timeout time.Duration) int {
	c.t.Helper()
	leader := -1
	Eventually(c.t, timeout, fmt.Sprintf("a node other than %d to lead %s", old, stream), func() bool {
		leader = c.StreamLeader(stream)
		return leader >= 0 && leader != old
	})
	return leader
}

// WaitStreamCurrent waits until the stream has a leader and every other
// node holds a current replica of it.
func (c *Cluster) WaitStreamCurrent(stream string, timeout time.Duration) {
	c.t.Helper()
	Eventually(c.t, timeout, "every replica of "+stream+" to be current", func() bool {
		info, err := c.StreamInfo(stream)
		if err != nil || info.Cluster == nil || info.Cluster.Leader == "" || len(info.Cluster.Replicas) != c.Size()-1 {
			return false
		}
		for _, r := range info.Cluster.Replicas {
			if !r.Current || r.Offline {
				return false
			}
		}
		return true
	})
}
