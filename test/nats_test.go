package test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nkeys"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/gateway"
	"github.com/levee-gw/levee/test/harness"
)

// The subjects Levee publishes and subscribes to, as the README lists them
// for a NATS user of its own: nothing more is needed.
var (
	natsPublish   = []string{"levee.>", "$JS.API.>", "$JS.ACK.LEVEE_JOBS.>"}
	natsSubscribe = []string{"levee.>", "_INBOX.>"}
)

// testPKI is a CA of one test's own, a server certificate for 127.0.0.1 and
// localhost, and a client certificate, as PEM files.
type testPKI struct {
	CA, ServerCert, ServerKey, ClientCert, ClientKey string
}

func newTestPKI(t *testing.T) *testPKI {
	t.Helper()
	dir := t.TempDir()
	write := func(name, kind string, der []byte) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	newKey := func() *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	now := time.Now()
	caKey := newKey()
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "levee test CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}
	issue := func(serial int64, name string, usage x509.ExtKeyUsage, certFile, keyFile string) (string, string) {
		key := newKey()
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: name},
			NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature,
			ExtKeyUsage: []x509.ExtKeyUsage{usage}}
		if usage == x509.ExtKeyUsageServerAuth {
			tmpl.DNSNames, tmpl.IPAddresses = []string{"localhost"}, []net.IP{net.IPv4(127, 0, 0, 1)}
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		keyDER, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			t.Fatal(err)
		}
		return write(certFile, "CERTIFICATE", der), write(keyFile, "PRIVATE KEY", keyDER)
	}
	p := &testPKI{CA: write("ca.pem", "CERTIFICATE", caDER)}
	p.ServerCert, p.ServerKey = issue(2, "levee test NATS", x509.ExtKeyUsageServerAuth, "server.pem", "server-key.pem")
	p.ClientCert, p.ClientKey = issue(3, "levee", x509.ExtKeyUsageClientAuth, "client.pem", "client-key.pem")
	return p
}

// startTLSNATS runs a JetStream server that takes TLS connections only, from
// clients with a certificate of the test CA (mutual TLS).
func startTLSNATS(t *testing.T, p *testPKI) *dev.NATS {
	t.Helper()
	cert, err := tls.LoadX509KeyPair(p.ServerCert, p.ServerKey)
	if err != nil {
		t.Fatal(err)
	}
	caPEM, err := os.ReadFile(p.CA)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	n, err := dev.StartNATSServer(&server.Options{ServerName: "levee-tls", Host: "127.0.0.1", Port: server.RANDOM_PORT,
		JetStream: true, StoreDir: t.TempDir(), NoLog: true, TLS: true, TLSVerify: true, TLSTimeout: 2,
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}, ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS12}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.Stop)
	return n
}

// Levee with nats_tls reaches a NATS server that requires mutual TLS, and
// jobs work end to end over it; without the CA, with no client
// certificate, or expecting another server name, it does not start, and
// says which setting to look at.
func TestNATSTLS(t *testing.T) {
	p := newTestPKI(t)
	n := startTLSNATS(t, p)
	if !strings.HasPrefix(n.URL, "tls://") {
		t.Fatalf("the server's URL %s", n.URL)
	}
	good := config.NATSTLS{CAFile: p.CA, CertFile: p.ClientCert, KeyFile: p.ClientKey}
	env := harness.StartWith(t, nil, dev.StackOptions{NATSURL: n.URL, NATSTLS: good})
	state, err := env.Gateway.Queue.Conn().TLSConnectionState()
	if err != nil || !state.HandshakeComplete || len(state.PeerCertificates) == 0 || state.PeerCertificates[0].Subject.CommonName != "levee test NATS" {
		t.Fatalf("the queue's connection is not TLS to the test server: %v %+v", err, state)
	}
	_, j := submit(t, env, env.APIKey, jobBody(5, "low"))
	if done := waitJob(t, env, env.APIKey, j.ID, 30*time.Second); done.Status != "succeeded" {
		t.Fatalf("a job over TLS: %+v", done)
	}

	for _, tc := range []struct {
		name string
		tls  config.NATSTLS
		want []string
	}{
		{"without the CA", config.NATSTLS{CertFile: p.ClientCert, KeyFile: p.ClientKey},
			[]string{"certificate signed by unknown authority", "nats_tls.ca_file"}},
		// The server refuses the handshake; whether the client reads its
		// alert ("certificate required") or finds the connection closed
		// first is a race, so only TLS is sure to be named.
		{"without a client certificate", config.NATSTLS{CAFile: p.CA}, []string{"tls"}},
		{"expecting another server name", config.NATSTLS{CAFile: p.CA, CertFile: p.ClientCert, KeyFile: p.ClientKey, ServerName: "nats.example"},
			[]string{"not nats.example", "nats_tls.server_name"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := *env.Config
			cfg.Listen, cfg.NATSTLS = "127.0.0.1:0", tc.tls
			if err := cfg.Validate(); err != nil {
				t.Fatal(err)
			}
			g, err := gateway.Start(context.Background(), &cfg, env.Store, gateway.Roles{API: true}, slog.New(slog.NewTextHandler(io.Discard, nil)))
			if err == nil {
				_ = g.Shutdown(context.Background())
				t.Fatal("started")
			}
			t.Logf("%v", err)
			for _, want := range tc.want {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("the error does not say %q", want)
				}
			}
		})
	}
}

// serveOver runs `levee serve` (with workers) as its own process on env's
// database and the NATS in env's config, with extra config, logging at
// debug level, and returns its base URL once it is ready.
func serveOver(t *testing.T, env *harness.Env, extra string) (string, *harness.Process, string) {
	t.Helper()
	addr := freeAddr(t)
	cfgPath, penv := processConfig(t, env, addr, "worker: {enabled: true}\n"+extra)
	p := harness.Spawn(t, append(penv, "LEVEE_LOG_LEVEL=debug"), "serve", "--config", cfgPath)
	base := "http://" + addr
	harness.Eventually(t, 30*time.Second, "levee serve to be ready", func() bool {
		resp, err := http.Get(base + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
	return base, p, cfgPath
}

// useEveryNATSPath runs through a gateway what touches NATS: a job (the
// stream, a consumer, acks), a deferred call (the done notice), a
// synchronous call (capacity sharing) and a cancelled job.
func useEveryNATSPath(t *testing.T, env *harness.Env, base string) {
	t.Helper()
	resp, raw := call(t, base, "/v1/jobs", env.APIKey, jobBody(5, "low"))
	if resp.StatusCode != 202 {
		t.Fatalf("submit: %d %s", resp.StatusCode, raw)
	}
	if resp, raw := call(t, base, "/v1/chat/completions", env.APIKey, chat(5), "X-Levee-Priority", "low", "Prefer", "wait=20"); resp.StatusCode != 200 {
		t.Fatalf("a deferred call: %d %s", resp.StatusCode, raw)
	}
	if resp, raw := call(t, base, "/v1/chat/completions", env.APIKey, chat(5)); resp.StatusCode != 200 {
		t.Fatalf("a synchronous call: %d %s", resp.StatusCode, raw)
	}
	harness.Eventually(t, 30*time.Second, "the jobs to succeed", func() bool {
		var open int
		_ = env.Store.Pool().QueryRow(context.Background(), `SELECT count(*) FROM jobs WHERE status <> 'succeeded'`).Scan(&open)
		return open == 0
	})
}

// stopAndRead stops a levee process gracefully and returns all it printed.
func stopAndRead(t *testing.T, p *harness.Process) string {
	t.Helper()
	if err := p.Cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := p.Cmd.Wait(); err != nil {
		t.Fatalf("levee serve: %v\n%s", err, p.Output())
	}
	return p.Output()
}

// A NATS user and password in nats_url work, with only the permissions the
// README lists; the password appears nowhere in levee serve's debug log,
// nor in levee config check's output, which shows the URL with xxxxx.
func TestNATSUserInURLIsNeverShown(t *testing.T) {
	if testing.Short() {
		t.Skip("runs levee processes")
	}
	const password = "s3cret-nats-pa55"
	n, err := dev.StartNATSServer(&server.Options{ServerName: "levee-auth", Host: "127.0.0.1", Port: server.RANDOM_PORT,
		JetStream: true, StoreDir: t.TempDir(), NoLog: true,
		Users: []*server.User{{Username: "levee", Password: password, Permissions: &server.Permissions{
			Publish: &server.SubjectPermission{Allow: natsPublish}, Subscribe: &server.SubjectPermission{Allow: natsSubscribe}}}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.Stop)
	hostPort := strings.TrimPrefix(n.URL, "nats://")
	natsURL := "nats://levee:" + password + "@" + hostPort
	env := harness.StartWith(t, nil, dev.StackOptions{NATSURL: natsURL, NoWorkers: true})

	base, p, cfgPath := serveOver(t, env, "")
	useEveryNATSPath(t, env, base)
	out := stopAndRead(t, p)
	if !strings.Contains(out, "levee is serving") {
		t.Fatalf("levee serve's log was not read:\n%s", out)
	}
	if strings.Contains(out, password) {
		t.Fatalf("levee serve logged the NATS password:\n%s", out)
	}
	if strings.Contains(strings.ToLower(out), "permissions violation") {
		t.Fatalf("levee needs a permission the README does not list:\n%s", out)
	}

	check := harness.Spawn(t, []string{"LEVEE_SIM_KEY=x"}, "config", "check", cfgPath)
	if err := check.Cmd.Wait(); err != nil {
		t.Fatalf("config check: %v\n%s", err, check.Output())
	}
	if strings.Contains(check.Output(), password) || !strings.Contains(check.Output(), "NATS at nats://levee:xxxxx@"+hostPort) {
		t.Fatalf("config check shows:\n%s", check.Output())
	}
}

// A .creds file (a user JWT of an account under an operator, the
// decentralised authentication nsc sets up) works, with the README's
// permissions in the JWT.
func TestNATSCredsFile(t *testing.T) {
	if testing.Short() {
		t.Skip("runs levee processes")
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	newKeys := func(create func() (nkeys.KeyPair, error)) (nkeys.KeyPair, string) {
		kp, err := create()
		must(err)
		pub, err := kp.PublicKey()
		must(err)
		return kp, pub
	}
	operator, operatorPub := newKeys(nkeys.CreateOperator)
	_, sysPub := newKeys(nkeys.CreateAccount)
	account, accountPub := newKeys(nkeys.CreateAccount)
	user, userPub := newKeys(nkeys.CreateUser)

	opJWT, err := jwt.NewOperatorClaims(operatorPub).Encode(operator)
	must(err)
	opClaims, err := jwt.DecodeOperatorClaims(opJWT)
	must(err)
	sysJWT, err := jwt.NewAccountClaims(sysPub).Encode(operator)
	must(err)
	ac := jwt.NewAccountClaims(accountPub)
	ac.Limits.JetStreamLimits = jwt.JetStreamLimits{MemoryStorage: -1, DiskStorage: -1, Streams: -1, Consumer: -1}
	accountJWT, err := ac.Encode(operator)
	must(err)
	uc := jwt.NewUserClaims(userPub)
	uc.Pub.Allow.Add(natsPublish...)
	uc.Sub.Allow.Add(natsSubscribe...)
	userJWT, err := uc.Encode(account)
	must(err)
	seed, err := user.Seed()
	must(err)
	creds, err := jwt.FormatUserConfig(userJWT, seed)
	must(err)
	credsPath := filepath.Join(t.TempDir(), "levee.creds")
	must(os.WriteFile(credsPath, creds, 0o600))

	resolver := &server.MemAccResolver{}
	must(resolver.Store(sysPub, sysJWT))
	must(resolver.Store(accountPub, accountJWT))
	n, err := dev.StartNATSServer(&server.Options{ServerName: "levee-operator", Host: "127.0.0.1", Port: server.RANDOM_PORT,
		JetStream: true, StoreDir: t.TempDir(), NoLog: true,
		TrustedOperators: []*jwt.OperatorClaims{opClaims}, AccountResolver: resolver, SystemAccount: sysPub})
	must(err)
	t.Cleanup(n.Stop)

	env := harness.StartWith(t, nil, dev.StackOptions{NATSURL: n.URL, NATSCreds: credsPath, NoWorkers: true})
	base, p, _ := serveOver(t, env, "nats_creds: "+credsPath+"\n")
	useEveryNATSPath(t, env, base)
	out := stopAndRead(t, p)
	if strings.Contains(strings.ToLower(out), "permissions violation") {
		t.Fatalf("levee needs a permission the README does not list:\n%s", out)
	}
	if strings.Contains(out, string(seed)) {
		t.Fatalf("levee serve logged the nkey seed:\n%s", out)
	}

	// Without the file the server refuses Levee, and Levee says where to look.
	cfg := *env.Config
	cfg.Listen, cfg.NATSCreds = "127.0.0.1:0", ""
	if _, err := gateway.Start(context.Background(), &cfg, env.Store, gateway.Roles{API: true}, slog.New(slog.NewTextHandler(io.Discard, nil))); err == nil ||
		!strings.Contains(err.Error(), "nats_creds") {
		t.Fatalf("without creds: %v", err)
	}
}

// queue.domain names the JetStream domain Levee's stream lives in: with the
// server's domain jobs work, with another one Levee does not start.
func TestNATSDomain(t *testing.T) {
	n, err := dev.StartNATSServer(&server.Options{ServerName: "levee-hub", Host: "127.0.0.1", Port: server.RANDOM_PORT,
		JetStream: true, JetStreamDomain: "hub", StoreDir: t.TempDir(), NoLog: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.Stop)
	f := harness.Fast(dev.DefaultFile())
	f.Queue.Domain = "hub"
	env := harness.StartWith(t, f, dev.StackOptions{NATSURL: n.URL})
	_, j := submit(t, env, env.APIKey, jobBody(5, "low"))
	if done := waitJob(t, env, env.APIKey, j.ID, 30*time.Second); done.Status != "succeeded" {
		t.Fatalf("a job in domain hub: %+v", done)
	}
	cfg := *env.Config
	cfg.Listen, cfg.Queue.Domain = "127.0.0.1:0", "elsewhere"
	_, err = gateway.Start(context.Background(), &cfg, env.Store, gateway.Roles{API: true}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err == nil || !strings.Contains(err.Error(), "queue.domain") {
		t.Fatalf("in a domain the server does not have: %v", err)
	}
	t.Logf("%v", err)
}
