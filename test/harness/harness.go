// Package harness starts hermetic Levee stacks for integration tests: one
// private Postgres cluster per test binary (or DATABASE_URL's server) with a
// fresh database per stack, an embedded NATS JetStream server, the simulator
// and the gateway, all on random loopback ports, through the same dev.Stack
// that `levee dev` runs.
package harness

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/store"
)

// cluster is the test binary's Postgres; set by Main.
var (
	cluster *dev.Postgres
	baseURL string
	dbSeq   atomic.Int64
)

// Main wraps a test binary's TestMain: it starts Postgres once unless
// DATABASE_URL is set, runs the tests and stops it.
func Main(m *testing.M) {
	code := func() int {
		baseURL = os.Getenv("DATABASE_URL")
		if baseURL == "" {
			dir, err := os.MkdirTemp("", "levee-test-pg-")
			if err != nil {
				fmt.Fprintln(os.Stderr, "harness:", err)
				return 1
			}
			defer os.RemoveAll(dir)
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			cluster, err = dev.StartPostgres(ctx, dir+"/pg", dev.PostgresOptions{Ephemeral: true})
			if err != nil {
				fmt.Fprintln(os.Stderr, "harness:", err)
				return 1
			}
			defer cluster.Stop()
			baseURL = cluster.URL
		}
		defer func() {
			if binPath != "" {
				os.RemoveAll(filepath.Dir(binPath))
			}
		}()
		return m.Run()
	}()
	os.Exit(code)
}

// NewDatabase creates an empty database for one test and returns its URL.
func NewDatabase(t testing.TB) string {
	t.Helper()
	if baseURL == "" {
		t.Fatal("harness: Main was not called from TestMain")
	}
	ctx := context.Background()
	name := fmt.Sprintf("levee_test_%d_%d", os.Getpid(), dbSeq.Add(1))
	conn, err := pgx.Connect(ctx, baseURL)
	if err != nil {
		t.Fatalf("harness: %v", err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		t.Fatalf("harness: %v", err)
	}
	u, err := url.Parse(baseURL)
	if err != nil {
		t.Fatalf("harness: %v", err)
	}
	u.Path = "/" + name
	return u.String()
}

// Env is a running stack for one test.
type Env struct {
	*dev.Stack
	t        testing.TB
	natsPort int
}

// Start runs a stack with the given dev file (nil: levee dev's defaults,
// with latency removed so tests are quick) and stops it at cleanup.
func Start(t testing.TB, f *dev.File) *Env {
	t.Helper()
	return StartWith(t, f, dev.StackOptions{})
}

// StartWith is Start with more options (Listen, DataDir, File, Ephemeral and
// Log are the harness's; DatabaseURL too unless set).
func StartWith(t testing.TB, f *dev.File, o dev.StackOptions) *Env {
	t.Helper()
	if f == nil {
		f = Fast(dev.DefaultFile())
	}
	dir := t.TempDir()
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	if o.DatabaseURL == "" {
		o.DatabaseURL = NewDatabase(t)
	}
	o.Listen, o.DataDir, o.File, o.Ephemeral, o.Log = "127.0.0.1:0", dir, f, true, log
	if o.NATSURL == "" {
		o.NATSURL = os.Getenv("NATS_URL")
	}
	s, err := dev.StartStack(context.Background(), o)
	if err != nil {
		t.Fatalf("harness: start stack: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := s.Stop(ctx); err != nil {
			t.Logf("harness: stop: %v", err)
		}
	})
	return &Env{Stack: s, t: t}
}

// RestartNATS stops the embedded NATS server and starts it again on the same
// port and storage, as a restart of the real server would.
func (e *Env) RestartNATS() { e.restartNATS(false) }

// RestartNATSEmpty restarts the embedded NATS server with its storage wiped:
// everything JetStream held is gone.
func (e *Env) RestartNATSEmpty() { e.restartNATS(true) }

func (e *Env) restartNATS(wipe bool) {
	e.t.Helper()
	e.StopNATS()
	if wipe {
		if err := os.RemoveAll(e.NATSDir); err != nil {
			e.t.Fatal(err)
		}
	}
	e.StartNATS()
}

// StopNATS stops the embedded NATS server (StartNATS brings it back on the
// same port and storage).
func (e *Env) StopNATS() {
	e.t.Helper()
	if e.NATS == nil {
		e.t.Skip("NATS_URL is set: cannot restart an external server")
	}
	e.natsPort = e.NATS.Server.Addr().(*net.TCPAddr).Port
	e.NATS.Stop()
}

// StartNATS starts the server StopNATS stopped.
func (e *Env) StartNATS() {
	e.t.Helper()
	n, err := dev.StartNATS(e.NATSDir, e.natsPort)
	if err != nil {
		e.t.Fatalf("harness: restart NATS: %v", err)
	}
	e.NATS = n
}

// Postgres is a private cluster of one test's own, which it may restart.
type Postgres struct {
	*dev.Postgres
	t   testing.TB
	dir string
}

// PrivatePostgres starts a cluster for one test (stopped at cleanup).
func PrivatePostgres(t testing.TB) *Postgres {
	t.Helper()
	dir, err := os.MkdirTemp("", "levee-test-pg-")
	if err != nil {
		t.Fatal(err)
	}
	_ = os.Chmod(dir, 0o755)
	pg, err := dev.StartPostgres(context.Background(), dir+"/pg", dev.PostgresOptions{Ephemeral: true})
	if err != nil {
		t.Fatalf("harness: %v", err)
	}
	p := &Postgres{Postgres: pg, t: t, dir: dir}
	t.Cleanup(func() {
		_ = p.Postgres.Stop()
		os.RemoveAll(dir)
	})
	return p
}

// Stop stops the server (fast shutdown: sessions are cut, nothing lost).
func (p *Postgres) Stop() {
	p.t.Helper()
	if err := p.Postgres.Stop(); err != nil {
		p.t.Fatalf("harness: %v", err)
	}
}

// Freeze stops every process of the cluster with SIGSTOP: connections stay
// open and nothing answers, as when a primary hangs. Thaw resumes them.
func (p *Postgres) Freeze() { p.signal(syscall.SIGSTOP) }

// Thaw resumes a frozen cluster.
func (p *Postgres) Thaw() { p.signal(syscall.SIGCONT) }

func (p *Postgres) signal(sig syscall.Signal) {
	p.t.Helper()
	raw, err := os.ReadFile(filepath.Join(p.Dir, "postmaster.pid"))
	if err != nil {
		p.t.Fatalf("harness: %v", err)
	}
	first, _, _ := strings.Cut(string(raw), "\n")
	root, err := strconv.Atoi(strings.TrimSpace(first))
	if err != nil {
		p.t.Fatalf("harness: postmaster.pid: %v", err)
	}
	// The postmaster first, so it starts no backend while its children are
	// found. A signal is delivered asynchronously: a postmaster running on
	// another core can still fork a backend after kill returns, so the
	// children are looked for only once it is seen stopped, and again
	// until no new one turns up.
	_ = syscall.Kill(root, sig)
	if sig == syscall.SIGSTOP {
		deadline := time.Now().Add(2 * time.Second)
		for procState(root) != "T" && procState(root) != "t" && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
	}
	signalled := map[int]bool{}
	for {
		fresh := 0
		for _, pid := range childrenOf(root) {
			if !signalled[pid] {
				signalled[pid] = true
				fresh++
				_ = syscall.Kill(pid, sig)
			}
		}
		if fresh == 0 {
			return
		}
	}
}

// procState is a process's state letter from /proc ("" if gone).
func procState(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return ""
	}
	var state string
	_, _ = fmt.Sscan(string(b[strings.LastIndexByte(string(b), ')')+1:]), &state)
	return state
}

// childrenOf lists the processes whose parent is root.
func childrenOf(root int) []int {
	var pids []int
	stats, _ := filepath.Glob("/proc/[0-9]*/stat")
	for _, st := range stats {
		b, err := os.ReadFile(st)
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...: comm may hold spaces, so read after ')'.
		rest := string(b[strings.LastIndexByte(string(b), ')')+1:])
		var state string
		var ppid int
		if _, err := fmt.Sscan(rest, &state, &ppid); err == nil && ppid == root {
			pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(st)))
			pids = append(pids, pid)
		}
	}
	return pids
}

// Start starts it again on the same port and data.
func (p *Postgres) Start() {
	p.t.Helper()
	pg, err := dev.StartPostgres(context.Background(), p.Dir, dev.PostgresOptions{Ephemeral: true, Port: p.Port})
	if err != nil {
		p.t.Fatalf("harness: restart Postgres: %v", err)
	}
	p.Postgres = pg
}

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// Binary builds levee once per test binary and returns its path.
func Binary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "levee-bin-")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "levee")
		out, err := exec.Command("go", "build", "-o", binPath, "github.com/levee-gw/levee/cmd/levee").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("%v: %s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatalf("harness: build levee: %v", buildErr)
	}
	return binPath
}

// Process is a levee subprocess.
type Process struct {
	Cmd *exec.Cmd
	out *lockedWriter
}

// Output is what it printed so far.
func (p *Process) Output() string {
	p.out.mu.Lock()
	defer p.out.mu.Unlock()
	return p.out.w.String()
}

// Spawn runs `levee args...` with extra environment; it is killed at cleanup.
func Spawn(t testing.TB, env []string, args ...string) *Process {
	t.Helper()
	cmd := exec.Command(Binary(t), args...)
	cmd.Env = append(os.Environ(), env...)
	out := &lockedWriter{w: &bytes.Buffer{}}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatalf("harness: spawn: %v", err)
	}
	p := &Process{Cmd: cmd, out: out}
	t.Cleanup(func() { p.Kill() })
	return p
}

// Kill sends SIGKILL (kill -9) and waits.
func (p *Process) Kill() {
	if p.Cmd.ProcessState != nil {
		return
	}
	_ = p.Cmd.Process.Kill()
	_ = p.Cmd.Wait()
}

type lockedWriter struct {
	mu sync.Mutex
	w  *bytes.Buffer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// Fast removes simulated latency from a dev file.
func Fast(f *dev.File) *dev.File {
	for i := range f.Deployments {
		f.Deployments[i].Sim.TTFT, f.Deployments[i].Sim.PerToken, f.Deployments[i].Sim.Embedding = 0, 0, 0
	}
	return f
}

// NewKey creates a tenant (if needed) and a key for it.
func (e *Env) NewKey(tenant string) string {
	e.t.Helper()
	ctx := context.Background()
	if _, err := e.Store.CreateTenant(ctx, &store.CreateTenantParams{Name: tenant}); err != nil && !strings.Contains(err.Error(), "exists") {
		e.t.Fatalf("harness: %v", err)
	}
	_, secret, err := e.Store.CreateKey(ctx, &store.CreateKeyParams{TenantName: tenant})
	if err != nil {
		e.t.Fatalf("harness: %v", err)
	}
	return secret
}

// FlushUsage waits until every usage row recorded so far is written.
func (e *Env) FlushUsage() {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := e.Gateway.Ledger.Flush(ctx); err != nil {
		e.t.Fatalf("harness: flush usage: %v", err)
	}
}

// Eventually polls cond until it holds or the timeout passes.
func Eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
