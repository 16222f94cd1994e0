package test

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/test/harness"
)

// slowProxy forwards TCP connections to target after holding each for
// delay: a NATS that takes a moment to answer, as one coming up does.
func slowProxy(t *testing.T, target string, delay time.Duration) (string, chan struct{}) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	held := make(chan struct{}, 16)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				held <- struct{}{}
				time.Sleep(delay)
				u, err := net.Dial("tcp", target)
				if err != nil {
					return
				}
				defer u.Close()
				go func() { _, _ = io.Copy(u, c) }()
				_, _ = io.Copy(c, u)
			}()
		}
	}()
	return l.Addr().String(), held
}

// A SIGHUP that comes while levee serve is still starting (migrating,
// waiting for NATS: seconds, up to 30 s for a cluster coming up) must not
// kill it: a config reloader that signals right after changing the file,
// or an operator, would take a starting gateway down. It is taken as a
// reload once the process serves, as the file may have changed after it
// was read.
func TestReviewOpsSIGHUPWhileStarting(t *testing.T) {
	if testing.Short() {
		t.Skip("runs levee processes")
	}
	f := &dev.File{
		Deployments: []dev.FileDeployment{{Name: "a", Model: "gpt-4o", Kind: config.Standard, TPM: 1_000_000, RPM: 100_000}},
		Models:      []config.Model{{Name: "gpt-4o", Deployments: []string{"a"}}},
	}
	env := harness.StartWith(t, harness.Fast(f), dev.StackOptions{NoWorkers: true})
	natsAddr := strings.TrimPrefix(env.NATSURL, "nats://")
	slow, held := slowProxy(t, natsAddr, 1500*time.Millisecond)
	addr := freeAddr(t)
	base := "http://" + addr
	d := env.Config.Deployments[0]
	path := filepath.Join(t.TempDir(), "levee.yaml")
	body := fmt.Sprintf("listen: %s\ndatabase_url: %s\nnats_url: nats://%s\ndeployments:\n  - {name: a, model: gpt-4o, endpoint: %q, credential_env: LEVEE_SIM_KEY, tpm: 1000000, rpm: 100000}\nmodels:\n  - {name: gpt-4o, deployments: [a]}\n",
		addr, env.DatabaseURL, slow, d.Endpoint)
	if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	p := harness.Spawn(t, []string{"LEVEE_SIM_KEY=" + d.Credential, "LEVEE_LOG_LEVEL=info", "DATABASE_URL=", "NATS_URL="}, "serve", "--config", path)
	select {
	case <-held: // levee serve is connecting to NATS
	case <-time.After(30 * time.Second):
		t.Fatal("levee serve never connected to NATS")
	}
	exited := make(chan error, 1)
	go func() { exited <- p.Cmd.Wait() }()
	t.Cleanup(func() {
		_ = p.Cmd.Process.Kill()
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
		}
	})
	if err := p.Cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	harness.Eventually(t, 30*time.Second, "levee serve to answer after a SIGHUP while starting", func() bool {
		select {
		case err := <-exited:
			t.Fatalf("levee serve exited (%v) on a SIGHUP while starting", err)
		default:
		}
		resp, err := http.Get(base + "/healthz")
		if err == nil {
			resp.Body.Close()
		}
		return err == nil && resp.StatusCode == 200
	})
	harness.Eventually(t, 10*time.Second, "the early SIGHUP taken as a reload", func() bool { return metric(t, base, "levee_config_reloads_total") == 1 })
}
