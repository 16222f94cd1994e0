// Package dev owns the services Levee can embed so that one command runs the
// whole stack: a private PostgreSQL cluster started from the machine's
// initdb/pg_ctl, and an in-process NATS JetStream server. `levee dev`, the
// benchmarks and the test harness all start their services through it.
package dev

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
)

// Postgres is a running private cluster.
type Postgres struct {
	Dir  string
	Port int
	// URL connects to the levee database as the cluster's superuser.
	URL  string
	bin  string
	cred *syscall.Credential
}

// PostgresOptions tune a private cluster.
type PostgresOptions struct {
	// Ephemeral turns off fsync and friends: for tests and benchmarks whose
	// data does not outlive them.
	Ephemeral bool
	// Database is created if missing (default "levee").
	Database string
	// Port is fixed when set; otherwise a free one is picked.
	Port int
}

// FindPostgresBin locates the directory holding initdb and pg_ctl: PATH first,
// then Debian's /usr/lib/postgresql/<version>/bin (newest first).
func FindPostgresBin() (string, error) {
	if p, err := exec.LookPath("pg_ctl"); err == nil {
		if real, err := filepath.EvalSymlinks(p); err == nil {
			p = real
		}
		return filepath.Dir(p), nil
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(dirs, func(i, j int) bool {
		vi, _ := strconv.Atoi(filepath.Base(filepath.Dir(dirs[i])))
		vj, _ := strconv.Atoi(filepath.Base(filepath.Dir(dirs[j])))
		return vi > vj
	})
	for _, d := range dirs {
		if _, err := os.Stat(filepath.Join(d, "pg_ctl")); err == nil {
			return d, nil
		}
	}
	return "", errors.New("dev: no PostgreSQL binaries found (install Debian's postgresql package, or set DATABASE_URL)")
}

// StartPostgres initializes dir if it holds no cluster, starts the server on
// a free loopback port and creates the database. PostgreSQL refuses to run as
// root, so as root the cluster is owned by and run as the postgres user.
func StartPostgres(ctx context.Context, dir string, opt PostgresOptions) (*Postgres, error) {
	bin, err := FindPostgresBin()
	if err != nil {
		return nil, err
	}
	if opt.Database == "" {
		opt.Database = "levee"
	}
	dir, err = filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	pg := &Postgres{Dir: dir, bin: bin}
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			return nil, fmt.Errorf("dev: running as root needs a postgres user to run PostgreSQL as: %w", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		pg.cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("dev: %w", err)
	}
	if pg.cred != nil {
		if err := os.Chown(dir, int(pg.cred.Uid), int(pg.cred.Gid)); err != nil {
			return nil, fmt.Errorf("dev: %w", err)
		}
		// The postgres user must be able to reach the directory.
		for p := filepath.Dir(dir); p != "/" && p != "."; p = filepath.Dir(p) {
			if st, err := os.Stat(p); err == nil && st.Mode().Perm()&0o001 == 0 {
				_ = os.Chmod(p, st.Mode().Perm()|0o711)
			}
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "PG_VERSION")); err != nil {
		args := []string{"-D", dir, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"}
		if opt.Ephemeral {
			args = append(args, "--no-sync")
		}
		if out, err := pg.run(ctx, "initdb", args...); err != nil {
			return nil, fmt.Errorf("dev: initdb: %w: %s", err, out)
		}
	}
	port := opt.Port
	if port == 0 {
		if port, err = freePort(); err != nil {
			return nil, err
		}
	}
	pg.Port = port
	conf := fmt.Sprintf("-p %d -k %s -c listen_addresses=127.0.0.1 -c max_connections=200", port, dir)
	if opt.Ephemeral {
		conf += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
	}
	// A cluster left running by a killed parent holds the data directory.
	_, _ = pg.run(ctx, "pg_ctl", "-D", dir, "-m", "immediate", "-w", "stop")
	if out, err := pg.run(ctx, "pg_ctl", "-D", dir, "-o", conf, "-l", filepath.Join(dir, "postgres.log"), "-w", "-t", "60", "start"); err != nil {
		log, _ := os.ReadFile(filepath.Join(dir, "postgres.log"))
		return nil, fmt.Errorf("dev: pg_ctl start: %w: %s\n%s", err, out, tail(log, 2000))
	}
	admin := fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", port)
	conn, err := pgx.Connect(ctx, admin)
	if err != nil {
		pg.Stop()
		return nil, fmt.Errorf("dev: connect: %w", err)
	}
	defer conn.Close(ctx)
	var exists bool
	if err := conn.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)`, opt.Database).Scan(&exists); err != nil {
		pg.Stop()
		return nil, fmt.Errorf("dev: %w", err)
	}
	if !exists {
		if _, err := conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{opt.Database}.Sanitize()); err != nil {
			pg.Stop()
			return nil, fmt.Errorf("dev: create database: %w", err)
		}
	}
	pg.URL = fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable", port, opt.Database)
	return pg, nil
}

// CreateDatabase makes another database in the cluster and returns its URL
// (tests use one database each).
func (pg *Postgres) CreateDatabase(ctx context.Context, name string) (string, error) {
	conn, err := pgx.Connect(ctx, fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", pg.Port))
	if err != nil {
		return "", err
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()); err != nil {
		return "", err
	}
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable", pg.Port, name), nil
}

// Stop shuts the cluster down quickly.
func (pg *Postgres) Stop() error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if out, err := pg.run(ctx, "pg_ctl", "-D", pg.Dir, "-m", "fast", "-w", "stop"); err != nil {
		return fmt.Errorf("dev: pg_ctl stop: %w: %s", err, out)
	}
	return nil
}

func (pg *Postgres) run(ctx context.Context, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, filepath.Join(pg.bin, name), args...)
	cmd.Dir = pg.Dir
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	if pg.cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: pg.cred}
	}
	// pg_ctl's server inherits these; keep it out of our process group so a
	// Ctrl-C reaches Levee first and Levee stops it cleanly.
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setpgid = true
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.Bytes(), err
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("dev: free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}
