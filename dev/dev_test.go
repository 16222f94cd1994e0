package dev

import (
	"context"
	"os"
	"testing"

	"github.com/jackc/pgx/v5"
)

func TestPostgresStartsAndRestarts(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a PostgreSQL cluster")
	}
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "levee-devtest-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	for round := 0; round < 2; round++ { // the second start reuses the cluster
		pg, err := StartPostgres(ctx, dir+"/pg", PostgresOptions{Ephemeral: true})
		if err != nil {
			t.Fatal(err)
		}
		conn, err := pgx.Connect(ctx, pg.URL)
		if err != nil {
			t.Fatal(err)
		}
		var db string
		if err := conn.QueryRow(ctx, "SELECT current_database()").Scan(&db); err != nil || db != "levee" {
			t.Fatalf("round %d: database %q, err %v", round, db, err)
		}
		conn.Close(ctx)
		if err := pg.Stop(); err != nil {
			t.Fatal(err)
		}
	}
}

func TestNATSJetStream(t *testing.T) {
	n, err := StartNATS(t.TempDir(), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Stop()
	if !n.Server.JetStreamEnabled() {
		t.Fatal("JetStream is off")
	}
}

func TestExampleDevFileLoads(t *testing.T) {
	f, err := LoadFile("../deploy/dev.example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(f.Deployments) != 3 || f.Deployments[0].Sim.PerToken == 0 {
		t.Fatalf("%+v", f)
	}
}
