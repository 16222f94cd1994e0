package dev

import (
	"fmt"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// NATS is an in-process NATS server with JetStream on.
type NATS struct {
	Server *server.Server
	URL    string
}

// StartNATS runs a JetStream-enabled server storing under dir. port 0 picks a
// free one.
func StartNATS(dir string, port int) (*NATS, error) {
	if port == 0 {
		port = server.RANDOM_PORT
	}
	return StartNATSServer(&server.Options{
		ServerName: "levee-embedded",
		Host:       "127.0.0.1",
		Port:       port,
		JetStream:  true,
		StoreDir:   dir,
		NoLog:      true,
	})
}

// StartNATSServer runs a server with the given options (tests use it for
// TLS, users and clusters) and waits until it takes connections. It never
// handles the process's signals: they are the embedding program's.
func StartNATSServer(opts *server.Options) (*NATS, error) {
	opts.NoSigs = true
	s, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("dev: nats: %w", err)
	}
	go s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		s.Shutdown()
		return nil, fmt.Errorf("dev: nats %s did not become ready", opts.ServerName)
	}
	return &NATS{Server: s, URL: s.ClientURL()}, nil
}

// Stop shuts the server down and waits for it.
func (n *NATS) Stop() {
	n.Server.Shutdown()
	n.Server.WaitForShutdown()
}
