package dev

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// NATSCluster is a JetStream cluster of in-process servers routed to each
// other over loopback, to test what Levee does when a node of a real
// cluster dies: each node has its own name and storage, and can be stopped
// and started again on the same ports and storage, as a restarted node of a
// real cluster would be. It is not safe for concurrent use.
type NATSCluster struct {
	// URL lists every node's client URL, comma separated, as nats_url
	// takes it.
	URL   string
	nodes []*clusterNode
}

type clusterNode struct {
	name                    string
	dir                     string
	clientPort, clusterPort int
	nats                    *NATS // nil while stopped
}

// StartNATSCluster starts size nodes storing under dir and waits until
// JetStream has elected a meta leader that every node follows.
func StartNATSCluster(ctx context.Context, dir string, size int) (_ *NATSCluster, err error) {
	// A JetStream cluster forms only from configured routes, and counts
	// them to learn its size, so every node must know every route port
	// before the first starts: they are picked up front. The client ports
	// too, so a restarted node is where its clients knew it.
	ports, err := freePorts(2 * size)
	if err != nil {
		return nil, err
	}
	c := &NATSCluster{}
	defer func() {
		if err != nil {
			c.Stop()
		}
	}()
	urls := make([]string, size)
	for i := range size {
		n := &clusterNode{name: fmt.Sprintf("levee-nats-%d", i), clientPort: ports[2*i], clusterPort: ports[2*i+1]}
		n.dir = filepath.Join(dir, n.name)
		c.nodes = append(c.nodes, n)
		urls[i] = "nats://127.0.0.1:" + strconv.Itoa(n.clientPort)
	}
	c.URL = strings.Join(urls, ",")
	for i := range c.nodes {
		if err := c.StartNode(i); err != nil {
			return nil, err
		}
	}
	if err := c.WaitReady(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

// options are node n's server options, the same at every start.
func (c *NATSCluster) options(n *clusterNode) *server.Options {
	// Every node's route, its own included (the server ignores a route to
	// itself): JetStream expects as many peers as routes.
	routes := make([]*url.URL, len(c.nodes))
	for i, m := range c.nodes {
		routes[i] = &url.URL{Scheme: "nats", Host: net.JoinHostPort("127.0.0.1", strconv.Itoa(m.clusterPort))}
	}
	return &server.Options{
		ServerName: n.name,
		Host:       "127.0.0.1",
		Port:       n.clientPort,
		JetStream:  true,
		StoreDir:   n.dir,
		NoLog:      true,
		Cluster:    server.ClusterOpts{Name: "levee", Host: "127.0.0.1", Port: n.clusterPort},
		Routes:     routes,
	}
}

// Size is the number of nodes, running or not.
func (c *NATSCluster) Size() int { return len(c.nodes) }

// Name is node i's server name (as stream and consumer infos name leaders).
func (c *NATSCluster) Name(i int) string { return c.nodes[i].name }

// Index is the node of a server name, or -1.
func (c *NATSCluster) Index(name string) int {
	for i, n := range c.nodes {
		if n.name == name {
			return i
		}
	}
	return -1
}

// Node is node i's server, nil while it is stopped.
func (c *NATSCluster) Node(i int) *NATS { return c.nodes[i].nats }

// StopNode shuts node i down: its clients' connections drop, and the
// JetStream groups it led elect another leader.
func (c *NATSCluster) StopNode(i int) {
	if n := c.nodes[i]; n.nats != nil {
		n.nats.Stop()
		n.nats = nil
	}
}

// StartNode starts node i, again after StopNode, on its ports and storage.
func (c *NATSCluster) StartNode(i int) error {
	n := c.nodes[i]
	if n.nats != nil {
		return fmt.Errorf("dev: nats %s is running", n.name)
	}
	s, err := StartNATSServer(c.options(n))
	if err != nil {
		return err
	}
	n.nats = s
	return nil
}

// WaitReady waits until the running nodes are clustered, one of them leads
// JetStream's meta group, and every one is current with it: streams can be
// created and placed.
func (c *NATSCluster) WaitReady(ctx context.Context) error {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		running, clustered, current, leaders := 0, 0, 0, 0
		for _, n := range c.nodes {
			if n.nats == nil {
				continue
			}
			s := n.nats.Server
			running++
			if s.JetStreamIsClustered() {
				clustered++
			}
			if s.JetStreamIsCurrent() {
				current++
			}
			if s.JetStreamIsLeader() {
				leaders++
			}
		}
		if running > 0 && clustered == running && current == running && leaders == 1 {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("dev: nats cluster: %d of %d running nodes clustered, %d current, %d meta leaders: %w",
				clustered, running, current, leaders, ctx.Err())
		case <-t.C:
		}
	}
}

// Stop shuts every node down.
func (c *NATSCluster) Stop() {
	for i := range c.nodes {
		c.StopNode(i)
	}
}

// freePorts returns n distinct loopback ports that are free now. Nothing
// reserves them: another program could take one before it is bound, which
// on a test machine does not happen in practice.
func freePorts(n int) ([]int, error) {
	ports := make([]int, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("dev: free port: %w", err)
		}
		// Held open until all are picked, so the n ports differ.
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}
